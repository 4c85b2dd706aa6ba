"""What ConServe's tests and benchmarks share: one `wait_for`, a fake API with the API server's merge-patch and
resourceVersion semantics, builders of api objects, a fake clock, per-test metric registries, the API calls of
e2e tests (`Api`) and `conserve` subcommands as processes (`OperatorProcess`).

Test infrastructure in the package (benchmarks and e2e tests import it too); nothing in the serving path does.
"""

from conserve.testkit.api import NOT_YET, Api, install_crds
from conserve.testkit.builders import (
    ConversationBuilder,
    PodBuilder,
    PoolBuilder,
    conversation_body,
    gpu_node,
    pod_body,
    pool_body,
)
from conserve.testkit.clock import FakeClock
from conserve.testkit.fakekube import FakeKube, merge_patch
from conserve.testkit.processes import ConserveProcesses, OperatorProcess
from conserve.testkit.wait import async_wait_for, wait_for

__all__ = [
    "NOT_YET",
    "Api",
    "ConserveProcesses",
    "ConversationBuilder",
    "FakeClock",
    "FakeKube",
    "OperatorProcess",
    "PodBuilder",
    "PoolBuilder",
    "async_wait_for",
    "conversation_body",
    "gpu_node",
    "install_crds",
    "merge_patch",
    "pod_body",
    "pool_body",
    "wait_for",
]
