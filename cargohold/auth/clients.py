"""Who the client is when requests come through a proxy, no I/O.

`X-Forwarded-For` is whatever the sender wrote, so it is believed only when the connection
comes from a configured proxy (`trusted_proxies`, default none). Then the client is the
rightmost address in the header that is not itself a trusted proxy (each proxy appends the
address it received the request from; anything left of a proxy we do not trust could be
invented). The audit log and the per-address login limit use that address.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs or plain addresses; ValueError for anything else."""
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values)


class TrustedProxies:
    def __init__(self, networks: Iterable[str] = ()):
        self.networks = parse_networks(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def client(self, peer: str, forwarded_for: list[str]) -> str:
        """The client's address: `peer` (the connection's address) unless it is a trusted proxy;
        then the rightmost untrusted address of the `X-Forwarded-For` headers (in order)."""
        if not self.networks or not self.trusts(peer):
            return peer
        hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
        for hop in reversed(hops):
            if not _is_address(hop):
                return peer                  # garbage in the chain: believe only the connection
            if not self.trusts(hop):
                return hop
            peer = hop                       # a proxy in front of our proxy: keep walking left
        return peer


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
