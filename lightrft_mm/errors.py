"""Typed errors. Each message says what is wrong, where (file, row, field), why, and the fix."""


class LightRFTError(Exception):
    """Base class of every error this package raises on bad input or configuration."""


class ConfigError(LightRFTError):
    """A configuration value is missing, mistyped or inconsistent."""


class RegistryError(LightRFTError, KeyError):
    """An unknown, duplicate or unloadable registry entry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DataError(LightRFTError):
    """A dataset row or shard does not follow the unified sample schema."""


class MediaError(DataError):
    """A media file is missing or cannot be decoded."""


class ModelError(LightRFTError):
    """A model cannot be found, built or loaded."""


class RolloutError(LightRFTError):
    """A rollout engine failed: not installed, not answering, or answering wrongly."""


class CheckpointError(LightRFTError):
    """A checkpoint cannot be written (disk full, non-finite weights) or resumed from."""


class TrainingError(LightRFTError):
    """Training cannot go on (e.g. every update of several steps in a row was non-finite)."""


class RewardError(LightRFTError):
    """A reward cannot be resolved or returned an invalid value."""


def did_you_mean(name: str, options, *, prefix: str = "") -> str:
    """" Did you mean 'x'?" for the closest of options, or "" when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.5)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""
