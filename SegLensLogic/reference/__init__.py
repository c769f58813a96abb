"""The shipped reference bundle's model card (:mod:`.card`): its measured figures, written from the build's results.

Where the bundle lives: :mod:`SegLensLogic.resources`; how it is rebuilt: :mod:`SegLensLogic.app.build_reference`.
"""
