-- wrk script: GET one manifest by tag over keep-alive connections.
-- The path and Accept header are fixed here; the address comes from the wrk URL.
-- done() prints one line "BENCH_JSON {...}" that bench/run.py parses.

wrk.method = "GET"
wrk.path = os.getenv("BENCH_MANIFEST_PATH") or "/v2/bench/app/manifests/latest"
wrk.headers["Accept"] = "application/vnd.oci.image.manifest.v1+json"

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "BENCH_JSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
      "\"errors\":{\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}," ..
      "\"latency_us\":{\"mean\":%.1f,\"stdev\":%.1f,\"max\":%d," ..
      "\"p50\":%d,\"p90\":%d,\"p99\":%d,\"p999\":%d}}\n",
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
