"""Operations: the platform's metrics (one catalogue), training telemetry, energy, and `aidc status`."""

__all__ = ["metrics"]
