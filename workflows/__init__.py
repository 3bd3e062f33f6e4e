"""Deterministic orchestration: one module per workflow, plus the saga helper.

Nothing here does I/O or imports a library that does (asyncpg, aiokafka, hvac, consul,
structlog, os.environ): workflows run in Temporal's sandbox and are replayed.
"""

from workflows.liveness import LivenessSweepWorkflow
from workflows.node import NodeWorkflow
from workflows.operation import OperationWorkflow

WORKFLOWS: list[type] = [OperationWorkflow, NodeWorkflow, LivenessSweepWorkflow]
