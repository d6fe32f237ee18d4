"""Final-answer extraction and equivalence (math-verify), run in killable worker processes."""

from mathtool.grading.extract import extract_boxed
from mathtool.grading.grader import GradeResult, grade, grade_async, is_correct, same_answer

__all__ = ["GradeResult", "extract_boxed", "grade", "grade_async", "is_correct", "same_answer"]
