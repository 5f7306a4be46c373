"""Training curves in the scene: each end-of-epoch progress line of a training job becomes a row of a
``vtkMRMLTableNode`` shown by a ``vtkMRMLPlotChartNode`` (loss and validation Dice series).
:class:`~deepsegrecon.scene.training.TrainingLogic` takes these methods (``scene``, ``task_name``, ``history`` and
the node attributes are its)."""

from __future__ import annotations

import math

from ._mrml import slicer_module

TABLE_COLUMNS = ("epoch", "loss", "val_dice", "part", "part_epoch")


def as_number(value) -> float | None:
    """``value`` as a finite float, else None (booleans and text included)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def epoch_row(event: dict) -> dict | None:
    """{"part", "epoch", "loss", "val_dice"} of an end-of-epoch progress event, else None.

    An end-of-epoch event has an integer ``epoch`` and a ``loss`` (or ``"event": "epoch"``); the per-batch
    ``"event": "iteration"`` lines also name the epoch but are not rows. ``part``: the network being trained,
    for tasks with several trained in turn (teeth: stage1, stage2; their epochs each count from 1), else "".
    """
    if not isinstance(event, dict) or event.get("state"):
        return None
    fields = event
    for key in ("metrics", "extra", "data"):  # the fields may come nested
        if "epoch" not in fields and isinstance(event.get(key), dict):
            fields = {**event[key], "event": event.get("event")}
    kind = fields.get("event")
    if kind not in (None, "epoch"):
        return None
    epoch = as_number(fields.get("epoch"))
    if epoch is None or epoch != int(epoch) or (kind is None and "loss" not in fields):
        return None
    return {"part": str(fields.get("part") or ""), "epoch": int(epoch), "loss": as_number(fields.get("loss")),
            "val_dice": as_number(fields.get("val_dice"))}


class TrainingCurves:
    """The curves half of :class:`~deepsegrecon.scene.training.TrainingLogic`."""

    def _create_curve_nodes(self, new_name: str, base_version: str | None) -> None:
        import vtk

        slicer = slicer_module()
        what = f"fine-tune {base_version} -> {new_name}" if base_version else f"training {new_name}"
        table = slicer.vtkMRMLTableNode()
        table.SetName(self.scene.GenerateUniqueName(f"{self.task_name} {what}"))
        for name, cls in zip(TABLE_COLUMNS, (vtk.vtkIntArray, vtk.vtkDoubleArray, vtk.vtkDoubleArray,
                                             vtk.vtkStringArray, vtk.vtkIntArray)):
            column = cls()
            column.SetName(name)
            table.AddColumn(column)
        table.SetAttribute("DeepSegRecon.task", self.task_name)
        table.SetAttribute("DeepSegRecon.version", new_name)
        table.SetAttribute("DeepSegRecon.base_version", base_version or "")
        table.SetAttribute("DeepSegRecon.state", "running")
        self.scene.AddNode(table)
        added = [table]
        try:
            series = {}
            for column, title, color in (("loss", "training loss", (0.85, 0.3, 0.1)),
                                         ("val_dice", "validation Dice", (0.1, 0.45, 0.85))):
                s = slicer.vtkMRMLPlotSeriesNode()
                s.SetName(self.scene.GenerateUniqueName(f"{new_name} {title}"))
                self.scene.AddNode(s)
                added.append(s)
                s.SetAndObserveTableNodeID(table.GetID())
                s.SetXColumnName("epoch")
                s.SetYColumnName(column)
                s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                s.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
                s.SetColor(*color)
                series[column] = s
            chart = slicer.vtkMRMLPlotChartNode()
            chart.SetName(self.scene.GenerateUniqueName(f"{self.task_name} {what} curves"))
            chart.SetTitle(f"{self.task_name}: {what}")
            chart.SetXAxisTitle("epoch")
            chart.SetYAxisTitle("loss / validation Dice")
            chart.SetLegendVisibility(True)
            self.scene.AddNode(chart)
            added.append(chart)
            for s in series.values():
                chart.AddAndObservePlotSeriesNodeID(s.GetID())
        except BaseException:
            for node in reversed(added):
                self.scene.RemoveNode(node)
            raise
        self.table_node, self.chart_node, self.series_nodes = table, chart, series

    def _on_events(self, events: list) -> None:
        rows = [r for r in (epoch_row(e) for e in events) if r is not None]
        for event in events:
            if isinstance(event, dict) and as_number(event.get("epochs")):
                self._planned_epochs = int(event["epochs"])
        if rows:
            self._add_rows(rows)

    def _add_rows(self, rows: list) -> None:
        """Add end-of-epoch rows (new ones only) and rewrite the table. Several parts (networks trained in turn)
        are shown one after the other: ``epoch`` counts on over the parts, ``part_epoch`` is the part's own."""
        new = False
        for r in rows:
            key = (r["part"], r["epoch"])
            if key not in self._rows:
                new = True
            self._rows[key] = r
        if not new and rows:
            return
        order = []
        for part, _ in self._rows:
            if part not in order:
                order.append(part)
        keys = sorted(self._rows, key=lambda k: (order.index(k[0]), k[1]))
        self.history = [{"epoch": n + 1, "loss": self._rows[k]["loss"], "val_dice": self._rows[k]["val_dice"],
                         "part": k[0], "part_epoch": k[1]} for n, k in enumerate(keys)]
        self._write_table()

    def _write_table(self) -> None:
        table = self.table_node
        if table is None or table.GetScene() is not self.scene:  # the user removed it: keep the history only
            return
        data = table.GetTable()
        columns = [data.GetColumnByName(c) for c in TABLE_COLUMNS]
        if any(c is None for c in columns):
            return
        nan = float("nan")
        was = table.StartModify()
        try:
            for c in columns:
                c.SetNumberOfValues(len(self.history))
            for n, r in enumerate(self.history):
                columns[0].SetValue(n, int(r["epoch"]))
                columns[1].SetValue(n, nan if r["loss"] is None else float(r["loss"]))
                columns[2].SetValue(n, nan if r["val_dice"] is None else float(r["val_dice"]))
                columns[3].SetValue(n, str(r["part"]))
                columns[4].SetValue(n, int(r["part_epoch"]))
            for c in columns:
                c.Modified()
            data.Modified()
            table.Modified()
        finally:
            table.EndModify(was)

    def _finish_curves(self, state: str) -> None:
        for node in (self.table_node, self.chart_node):
            if node is None or node.GetScene() is not self.scene:
                continue
            if state != "succeeded" and f"({state})" not in node.GetName():
                node.SetName(f"{node.GetName()} ({state})")
        if self.table_node is not None:
            self.table_node.SetAttribute("DeepSegRecon.state", state)

    def _with_curves(self, status: dict) -> dict:
        last = self.history[-1] if self.history else {}
        dice = [r["val_dice"] for r in self.history if r["val_dice"] is not None]
        return {**status, "epoch": last.get("part_epoch"), "part": last.get("part") or None,
                "epochs": self._planned_epochs, "loss": last.get("loss"),
                "val_dice": last.get("val_dice"), "best_val_dice": max(dice) if dice else None,
                "rows": len(self.history), "version": self.new_version, "base_version": self.base_version}
