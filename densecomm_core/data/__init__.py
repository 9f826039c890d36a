"""Task data: one typed record (``TaskExample``), loaders of public benchmark formats, answer extraction."""

from densecomm_core.data.example import LETTERS, DataError, TaskExample, fingerprint, render_multiple_choice
from densecomm_core.data.extract import KINDS, answers_match, canonical_number, extract_answer
from densecomm_core.data.formats import FORMATS, load_task_file

__all__ = [
    "FORMATS",
    "KINDS",
    "LETTERS",
    "DataError",
    "TaskExample",
    "answers_match",
    "canonical_number",
    "extract_answer",
    "fingerprint",
    "load_task_file",
    "render_multiple_choice",
]
