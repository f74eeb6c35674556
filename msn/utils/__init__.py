"""Process-level utilities under the library: the run directory's files (:mod:`.rundir`, torch-free), the
launcher's environment (:mod:`.launcher`), seeded random streams (:mod:`.seeding`), devices and autocast
(:mod:`.device`) and the process group (:mod:`.distributed`). They import only :mod:`msn.config` and
:mod:`msn.errors`."""
