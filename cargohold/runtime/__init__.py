"""Process plumbing that knows nothing of registries: bridging grpcio futures and streams into
anyio (`grpc_bridge`), pacing background work against foreground load (`pacing`), libc calls
(`libc`), heap tuning (`memory`), logging set-up (`logs`) and bucketed duration counts that
know no metrics library (`durations`).

May import: the standard library and third-party packages only (no other cargohold package)."""
