"""What a send to a destination achieved, whatever the protocol (C-STORE or STOW-RS)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StoreOutcome:
    """What one association (or a whole send) achieved."""

    acknowledged: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> reason

    def add(self, other: StoreOutcome) -> None:
        """Fold one batch's outcome into a whole send's."""
        self.acknowledged += other.acknowledged
        self.failures.update(other.failures)
