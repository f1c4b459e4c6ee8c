"""Structured logs (one JSON object per line) with no patient identifiers.

Code logs UIDs and counts only; as a second line of defence, fields whose names identify a patient are dropped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# Standard LogRecord attributes: everything else on a record came from `extra=` and is a structured field.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_PHI_FIELDS = {"patientname", "patientid", "patientbirthdate", "patient_name", "patient_id", "otherpatientids",
               "patientaddress", "accessionnumber", "accession_number"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and key.lower() not in _PHI_FIELDS:
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# pydicom's warnings about invalid values quote the value, which may be a name or a birth date
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class WithholdQuotedValues(logging.Filter):
    """pydicom's messages (its logger, and its warnings routed through py.warnings) lose quoted values."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings" or record.name.split(".")[0] == "pydicom":
            text = record.getMessage()
            if record.name == "py.warnings":
                # "file:line: Category: message\n  source line": the first line is the warning
                text = text.strip().splitlines()[0] if text.strip() else text
            record.msg, record.args = _QUOTED.sub("'<withheld>'", text), ()
        return True


def configure_logging(level: str | int = "WARNING") -> None:
    """Send JSON lines to stderr; stdout stays free for command output. Python warnings (pydicom's, Celery's)
    become log records too, so nothing else is printed to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(WithholdQuotedValues())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    logging.captureWarnings(True)
    # uvicorn's loggers may carry handlers of their own from an earlier dictConfig: ours only
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # pynetdicom is chatty at INFO and can print dataset contents at DEBUG.
    logging.getLogger("pynetdicom").setLevel(max(root.level, logging.WARNING))
