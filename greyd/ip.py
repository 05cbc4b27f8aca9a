"""Client addresses as greyd sees them (SPEC §5): an IPv4-mapped IPv6
address is the IPv4 address it carries, and a zone index (`%eth0`) is no
part of an address.

Pure functions over the standard library's `ipaddress`; nothing else of
greyd is imported here, so every module may use them.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=4096)
def client_address(text: str) -> Address:
    """The address `text` names; ValueError when it names none."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_text(text: str) -> str:
    """A peer address as greyd logs and relays it ('::ffff:192.0.2.7' -> '192.0.2.7')."""
    if ":" not in text:
        return text                     # IPv4, as the kernel writes it
    return str(client_address(text))


def unmapped_network(network: Network) -> Network:
    """An IPv6 network inside ::ffff:0:0/96 as the IPv4 network it covers."""
    if (network.version == 6 and network.prefixlen >= 96
            and network.network_address.ipv4_mapped is not None):
        return ipaddress.ip_network(
            (network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network
