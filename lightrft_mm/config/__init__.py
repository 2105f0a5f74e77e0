"""Typed configuration: one frozen dataclass per section (`sections`), YAML files plus
`key.sub=value` overrides (`load`). Every default lives in the dataclass and every field is
documented once, in its `help` metadata; `lightrft-mm train --help` and docs/config.md are
generated from it (`python -m lightrft_mm.config > docs/config.md`).
"""

from lightrft_mm.config.load import (SECTIONS, apply_overrides, build_config, help_text, load_config,
                                     parse_override, read_yaml, to_dict)
from lightrft_mm.config.sections import (AlgorithmConfig, AudioConfig, Config, DataConfig, ImageConfig,
                                         LoggingConfig, ModelConfig, RewardSpec, RolloutConfig, ScoringConfig,
                                         StrategyConfig, TrainerConfig, VideoConfig, WarmupConfig, opt)

__all__ = ["SECTIONS", "AlgorithmConfig", "AudioConfig", "Config", "DataConfig", "ImageConfig", "LoggingConfig",
           "ModelConfig", "RewardSpec", "RolloutConfig", "ScoringConfig", "StrategyConfig", "TrainerConfig",
           "VideoConfig", "WarmupConfig", "apply_overrides", "build_config", "help_text", "load_config",
           "opt", "parse_override", "read_yaml", "to_dict"]
