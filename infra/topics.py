"""Topic names (constants, one place) and their provisioning."""

from __future__ import annotations

INTERACTIONS = "somna.interactions"
REPLIES = "somna.replies"
RETRACTIONS = "somna.retractions"
SLEEP_JOBS = "somna.sleep-jobs"
FAST_WEIGHTS = "somna.fast-weights"
DEAD_LETTERS = "somna.dead-letters"

# Keyed by scope and co-partitioned: the same partition count for all of them.
CO_PARTITIONED = (INTERACTIONS, REPLIES, RETRACTIONS, SLEEP_JOBS, FAST_WEIGHTS)
ALL_TOPICS = (*CO_PARTITIONED, DEAD_LETTERS)
