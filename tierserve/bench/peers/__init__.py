"""Peers of `tierserve bench compare`: tierserve and the engines it is measured against, by name.

``llamacpp`` and ``vllm`` are aliases for the build or variant that was the faster where measured (docs/peers.md):
``llamacpp`` = ``llamacpp-native`` when it is built, else ``llamacpp-xllamacpp``; ``vllm`` = ``vllm-zen`` (with
AMD's zentorch) on an AMD CPU, else ``vllm-cpu``.
"""

from __future__ import annotations

from tierserve.bench.peers.base import Peer, PeerError, PeerSettings, peers_dir
from tierserve.bench.peers.llamacpp import LlamaCppNative, LlamaCppXllamacpp
from tierserve.bench.peers.tierserve_peer import TierservePeer
from tierserve.bench.peers.transformers_peer import TransformersPeer
from tierserve.bench.peers.vllm_cpu import VllmCpu, VllmCpuZen, is_amd

PEERS: dict[str, type[Peer]] = {cls.name: cls for cls in (
    TierservePeer, LlamaCppNative, LlamaCppXllamacpp, VllmCpu, VllmCpuZen, TransformersPeer)}
ALIASES = ("llamacpp", "vllm")

__all__ = ["ALIASES", "PEERS", "Peer", "PeerError", "PeerSettings", "make_peer", "peer_names", "peers_dir"]


def peer_names() -> list[str]:
    return [*PEERS, *ALIASES]


def make_peer(name: str, settings: PeerSettings) -> Peer:
    """The peer called ``name`` (an alias resolves to a concrete build); ``ValueError`` for an unknown name."""
    if name == "llamacpp":
        native = LlamaCppNative(settings)
        return native if native.available() else LlamaCppXllamacpp(settings)
    if name == "vllm":
        return VllmCpuZen(settings) if is_amd() else VllmCpu(settings)
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(peer_names())}")
    return PEERS[name](settings)
