"""Pictures of a run (behind msn-viz): the views the trainer makes, attention maps, curves, prototype use.

Each module builds one kind of picture from library calls (the trainer's own data and mask code, the
evaluation's encoder loader), so a picture cannot drift from what training does. Image mosaics are
composed pixel by pixel with numpy and written with PIL (exact sizes, testable pixels); charts use
matplotlib with a fixed figure size.
"""
