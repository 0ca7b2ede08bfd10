"""The pipeline's stages as data: their order, what each needs before it can start, and their help text.

Torch-free, so that the CLI can build one command per stage without loading anything heavy; ``run.py``
pairs each name with its function in ``stages.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    help: str
    needs: tuple[str, ...] = ()  # stages whose markers must exist (re-running a stage clears the later markers)
    trains: bool = False  # it runs the training loop, so --resume continues from its last checkpoint
    reads_inputs: bool = True  # it loads the data (and a file teacher): checked before anything is written
    # re-running it removes the markers of the later stages (built on its old output); a plan is only a forecast
    invalidates_later: bool = True
    # recipe sections read by this stage alone (and the stages after it): running it on an existing run takes a
    # change to them without --force, since it replaces everything built from the old values
    owns: tuple[str, ...] = ()


STAGES: tuple[StageSpec, ...] = (
    StageSpec("pick", "With student.arch: auto, export and time every candidate student untrained on this machine and pick "
              "the one with the most MACs that fits student.target; write student_choice.json and a plot. Nothing is trained; "
              "on a run that has trained, it is a what-if and keeps the trained choice.", invalidates_later=False),
    StageSpec("teacher", "Load (or train) the teacher, choose its fastest faithful runtime, measure its test accuracy.", trains=True),
    StageSpec("score", "Score every training image with the teacher's energy; write energy.npz and plots.", ("teacher",)),
    StageSpec("plan", "Time real steps on this device (nothing is trained or scored) and pick the HE-DA fraction the budget "
              "allows; write plan.json. On a finished run it is a what-if and changes no other stage.", invalidates_later=False),
    StageSpec("distill", "Distill the student, steering HE-DA's r to hold the budget (student.pt, metrics.jsonl, budget.json).",
              ("score", "plan"), trains=True),
    StageSpec("qat", "With export.int8.method: qat (or auto, when post-training int8 misses validate.max_int8_drop on held-out "
              "images), train the distilled student on with int8 simulated and the run's own loss (student.qat.pt, qat.json); "
              "the int8 targets quantise it.", ("distill",), trains=True, owns=("export",)),
    StageSpec("export", "Build every export target of export.formats (ONNX fp32, int8, fp16, edge; ExecuTorch, LiteRT).", ("distill",),
              owns=("export",)),
    StageSpec("validate", "Run every exported model in its runtime on the CPU: parity, accuracy, latency, size.", ("export",),
              owns=("validate",)),
    StageSpec("baseline", "With report.baseline: ce, train the same student with cross-entropy alone under the same schedule "
              "(baseline.json), so the report shows what distillation added.", trains=True),
    StageSpec("report", "Write report.md with tables and plots from the run folder's files.", reads_inputs=False),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def free_sections(name: str) -> frozenset[str]:
    """The recipe sections that running stage ``name`` on an existing run may change without --force: its own, and
    those of the later stages whose markers it clears (nothing built from the old values is kept)."""
    i = STAGE_NAMES.index(name)
    stages = STAGES[i:] if STAGES[i].invalidates_later else STAGES[i:i + 1]
    return frozenset(section for spec in stages for section in spec.owns)
