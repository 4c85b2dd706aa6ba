"""What ConServe's tests and benchmarks share: one `wait_for`, a fake API with the API server's merge-patch and
resourceVersion semantics, builders of api objects, a fake clock, per-test metric registries.

Test infrastructure in the package (benchmarks and e2e tests import it too); nothing in the serving path does.
"""

from conserve.testkit.builders import ConversationBuilder, PodBuilder, PoolBuilder
from conserve.testkit.clock import FakeClock
from conserve.testkit.fakekube import FakeKube, merge_patch
from conserve.testkit.wait import async_wait_for, wait_for

__all__ = [
    "ConversationBuilder",
    "FakeClock",
    "FakeKube",
    "PodBuilder",
    "PoolBuilder",
    "async_wait_for",
    "merge_patch",
    "wait_for",
]
