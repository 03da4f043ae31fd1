"""Loaded into every vLLM worker (`worker_extension_cls`): in-place weight loading for RL rollouts.

The trainer's state dict (Hugging Face parameter names), packed as safetensors bytes, goes through
`collective_rpc` to each worker,
whose model maps the names onto its own (fused, sharded) layout with its `load_weights`: no checkpoint
is written or read. Suitable for the models this is used with on one node; a 70B policy across nodes
would use vLLM's NCCL weight-transfer engine instead.
"""

from __future__ import annotations


def pack(state: dict) -> bytes:
    """A state dict as safetensors bytes: collective_rpc's serializer passes bytes as they are."""
    from safetensors.torch import save

    return save({name: t.contiguous() for name, t in state.items()})


class WeightLoader:
    def fescale_load_weights(self, packed: bytes) -> int:
        from safetensors.torch import load

        weights = load(packed)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))  # re-runs post-load processing (CPU repacking, fusions)
        return len(weights)
