"""Byte-level tokenizer: the 256 UTF-8 byte values plus a few special ids for turns.

Every part of Somna turns an interaction event into tokens with ``render_turn``, so the
sleep worker, the inference agent and training all see exactly the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

N_BYTES = 256
PAD = 256  # padding of ragged batches; never attended, never written into S
BOS = 257  # start of a sequence (generation without any memory)
EOT = 258  # end of a turn; generation stops here
USER = 259  # start of a user turn
ASSISTANT = 260  # start of an assistant turn
SYSTEM = 261  # start of a system turn
VOCAB_SIZE = 262

ROLE_IDS = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM}
SPECIAL_NAMES = {
    PAD: "<pad>",
    BOS: "<bos>",
    EOT: "<eot>",
    USER: "<user>",
    ASSISTANT: "<assistant>",
    SYSTEM: "<system>",
}


def render_turn(role: str, text: str) -> list[int]:
    """The canonical tokens of one interaction turn: ``<role> utf8(text) <eot>``."""
    if role not in ROLE_IDS:
        raise ValueError(f"role must be one of {sorted(ROLE_IDS)}, got {role!r}")
    return [ROLE_IDS[role], *text.encode("utf-8"), EOT]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, specials above. Stateless; one instance is enough."""

    vocab_size = VOCAB_SIZE
    pad_id = PAD
    bos_id = BOS
    eot_id = EOT
    role_ids = ROLE_IDS

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` (no specials)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], *, show_specials: bool = False) -> str:
        """Bytes back to text; specials are dropped (or shown as ``<name>``)."""
        out = bytearray()
        parts: list[str] = []
        for i in ids:
            i = int(i)
            if 0 <= i < N_BYTES:
                out.append(i)
            elif show_specials:
                parts.append(out.decode("utf-8", errors="replace"))
                out.clear()
                parts.append(SPECIAL_NAMES.get(i, f"<{i}>"))
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)

    def render_turn(self, role: str, text: str) -> list[int]:
        return render_turn(role, text)
