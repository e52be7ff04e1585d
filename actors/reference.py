"""ReferenceActor: the frozen starting policy; log-probs only (ZeRO-3 keeps it sharded)."""

from actors.trainer import CausalLMRole


class ReferenceActor(CausalLMRole):
    trainable = False
