"""What a Dagster user reads of a fleet's run: refusals in the run config's words, failures without stacks.

The package's refusals speak to a person at a terminal (`pass --yes to confirm`, `production needs -p
approver`). A run launched from Dagster has no such flags: its options are the run's config (`confirm:
true`, `parameters: {approver: ...}`), so `in_config_words` says them that way.

A `dagster.Failure` is an intentional failure whose description says everything (a refusal, a failed
check with its record): Dagster's default console logger prints it with the stack of Dagster's own
frames, once for the step and once again for the run. `console_logger` is that logger with the stack
of a Failure left out and the run's repetition cut to its first line; an unexpected exception (a bug)
keeps its stack. The UI keeps the full event (its "Stack Trace" is one click away, not in the log line).
"""

from __future__ import annotations

import logging
import re

import dagster as dg
from dagster._utils.log import create_console_logger   # the default console logger's own construction

# The command line's words -> the run config's, most specific first.
_CONFIG_WORDS = (
    (re.compile(r"pass --yes to confirm"), "set confirm: true in the run's config to confirm"),
    (re.compile(r"--yes\b"), "confirm: true"),
    (re.compile(r"--run (\S+)"), r"run_id: \1"),
    (re.compile(r'-p (\w+) ("[^"]*"|true|false|\d+)'), r"parameters: {\1: \2}"),
    (re.compile(r"-p (\w+)"), r"parameters.\1"),
)


def in_config_words(text: str) -> str:
    """A refusal worded for the command line, reworded for a run's config."""
    for pattern, words in _CONFIG_WORDS:
        text = pattern.sub(words, text)
    return text


def _intentional(event) -> bool:
    """A step or run failure that came of a dagster.Failure (its description is the whole story)."""
    if event is None:
        return False
    if event.event_type == dg.DagsterEventType.STEP_FAILURE:
        return event.step_failure_data.user_failure_data is not None
    if event.event_type == dg.DagsterEventType.RUN_FAILURE:
        return _intentional(event.job_failure_data.first_step_failure_event)
    return False


class WithoutFailureStacks(logging.Filter):
    """The log line of an intentional failure: the step's says its description, the run's its first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        event = (getattr(record, "dagster_meta", None) or {}).get("dagster_event")
        if _intentional(event):
            head = str(record.msg).split("\n\n", 1)[0]
            if event.event_type == dg.DagsterEventType.STEP_FAILURE:
                head += "\n\n" + (event.step_failure_data.user_failure_data.description or "")
            record.msg, record.args = head, ()
        return True


@dg.logger(dg.Field({"log_level": dg.Field(str, is_required=False, default_value="DEBUG"),
                     "name": dg.Field(str, is_required=False, default_value="dagster")}),
           description="Dagster's colored console logger, without the stack of an intentional failure")
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = create_console_logger(name=init_context.logger_config["name"],
                                   level=init_context.logger_config["log_level"].upper())
    logger.addFilter(WithoutFailureStacks())
    return logger
