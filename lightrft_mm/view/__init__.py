"""The trajectory viewer: `lightrft-mm view RUN` writes a static HTML folder of a run's rollouts."""

from lightrft_mm.view.build import COPY_LIMIT, MediaPlacer, build_view, read_trajectories

__all__ = ["COPY_LIMIT", "MediaPlacer", "build_view", "read_trajectories"]
