"""Synthetic memory tasks (pure Python, seeded): the dialogue facts task and k-hop graphs."""

from model.tasks.common import Example, Question, name_pool
from model.tasks.facts import FactsConfig
from model.tasks.khop import KhopConfig

__all__ = ["Example", "FactsConfig", "KhopConfig", "Question", "name_pool"]
