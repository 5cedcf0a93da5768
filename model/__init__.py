"""The hybrid SSM-attention language model with a sleep cycle (torch only; fla optional).

How the other parts use it::

    lm = HybridLM.load(checkpoint_dir)                    # or HybridLM(HybridConfig(...))
    # inference agent, one state per scope (B = 1)
    state = lm.init_state()                               # or lm.rebuild_state(fw, W, events)
    logits, state = lm.wake(render_turn("user", text), state, offset=kafka_offset)
    reply_ids = lm.generate([ASSISTANT], state)           # on a copy: replies are not memory
    state = lm.swap_in(state, fast_weights, watermark)    # hot swap after a sleep job
    # sleep worker, many scopes at once (ragged chunks right-padded with PAD)
    batch = MemoryState.stack([MemoryState.from_fast_weights(fw, lm.config, w) for ...])
    slept = lm.sleep(padded_tokens, batch, passes=4, lengths=lengths, watermarks=to_marks)
    for one in slept.split(): model.artifact.save_artifact(path, one, ...)
    # training: differentiable wake/sleep/evict over long sequences
    logits = lm.forward_train(tokens, chunk=64, passes=4)

Errors derive from ``model.exceptions.ModelError``.
"""

from model.config import HybridConfig
from model.exceptions import ModelError
from model.hybrid import HybridLM
from model.state import MemoryState, PendingEvent
from model.tokenizer import ASSISTANT, EOT, PAD, USER, ByteTokenizer, render_turn

__all__ = [
    "ASSISTANT",
    "EOT",
    "PAD",
    "USER",
    "ByteTokenizer",
    "HybridConfig",
    "HybridLM",
    "MemoryState",
    "ModelError",
    "PendingEvent",
    "render_turn",
]
