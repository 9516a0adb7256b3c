"""``qalora reproduce``: the paper's comparison (Table 1) on a model, with one command."""

from qalora.reproduce.plan import BUDGETS, Budget, Row, plan_rows
from qalora.reproduce.report import write_docs
from qalora.reproduce.run import reproduce

__all__ = ["BUDGETS", "Budget", "Row", "plan_rows", "reproduce", "write_docs"]
