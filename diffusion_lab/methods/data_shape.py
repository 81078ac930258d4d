"""``data_shape``: the shape of one sample, for every module that draws samples."""

from __future__ import annotations


class DataShapeMixin:
    """Gives a LightningModule a ``data_shape`` property, (C, H, W) for images or (D,) for vectors.

    It is the attached DataModule's ``data_shape`` while a Trainer with one is attached (the data decide), else
    the value set on the module: by the CLI's data link, from a teacher's config, or by hand
    (``module.data_shape = (1, 8, 8)``) for sampling outside a Trainer.
    """

    _data_shape: tuple[int, ...] | None = None

    @property
    def data_shape(self) -> tuple[int, ...]:
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        shape = getattr(datamodule, "data_shape", None) or self._data_shape
        if shape is None:
            raise RuntimeError(
                f"{type(self).__name__}.data_shape is unknown: attach a DataModule with `data_shape` or set "
                "`model.data_shape` (e.g. (1, 8, 8))"
            )
        return tuple(shape)

    @data_shape.setter
    def data_shape(self, value: tuple[int, ...]) -> None:
        self._data_shape = tuple(value)


__all__ = ["DataShapeMixin"]
