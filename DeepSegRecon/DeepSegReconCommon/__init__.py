"""Qt widget helpers shared by the DeepSegRecon Slicer modules (installed beside them, run inside Slicer).

Qt wiring only: every button calls one method of the headless scene logic in ``deepsegrecon.scene`` (which the
tests call too). Not a module itself: Slicer only loads the ``<Module>.py`` files of the scripted-modules folder.
"""
