"""A synthetic robot-manipulation VQA dataset that a tiny, randomly initialised VLM can learn in minutes on a CPU.

Each record is its own rendered table-top scene: a table, 2-4 flat-coloured objects (cube, ball, cup), a
receptacle (bowl, box, plate or tray) and a parallel-jaw gripper hanging from the top edge. Questions follow the
RoboInter / LLaVA conversation format, with answers whose ground truth is computed from the very geometry that
was drawn.

Visual variety is kept deliberately low (four object colours, flat fills, few templates) so that a model seeing
the image at ~84 px can tie answers to pixels; objects are large and never overlap. Coordinates in answers are
normalised to [0, 1] (x by width, y by height) and always written with exactly three decimals: a fixed-width
number is easier for a tiny model to emit than json.dumps' variable-length floats, and it is still valid JSON.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import UserError
from ..fsutil import atomic_write_json
from ..outputs import atomic_dir, check_folder, claim_folder, cleanup_partials
from ..recipe.names import SYNTH_TASKS

TASKS = SYNTH_TASKS
# Record i asks CYCLE[i % len(CYCLE)]: each grounding task once, choice five times, yes/no once. With one record in
# eight a choice question, the tiny demo model answers every one with the same letter; at five in twelve (with
# the demo recipe's sample loss reduction and batches of 16) the letter follows the image. docs/experiments.md
# has the measurements.
CYCLE: tuple[str, ...] = (
    "current_bbox", "choice", "final_bbox", "choice", "contact_bbox", "choice", "gripper_bbox", "choice",
    "contact_point", "choice", "future_traj", "yesno",
)
SIZES = ((320, 180), (640, 480), (384, 384))  # DROID-like, RH20T-like, square
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
SHAPES = ("cube", "ball", "cup")
GRIPPER_GREY = (150, 150, 150)
# Fill colours, none an object colour. Each container has its own colour so that "which container" is a question a
# tiny random vision tower can answer (large areas of one colour are what it sees best).
RECEPTACLES = {"bowl": (140, 70, 170), "box": (240, 140, 40), "plate": (235, 235, 235), "tray": (40, 185, 185)}
_HOLLOW = ("bowl", "box")  # things go "in" them; plates and trays are things go "on"
_TABLE_TONES = ((170, 125, 80), (190, 150, 105), (150, 110, 75))
_WALL_TONES = ((60, 70, 85), (85, 80, 75), (45, 50, 55))

Box = tuple[int, int, int, int]  # pixels, half-open: covers x1 <= x < x2, y1 <= y < y2


@dataclass
class Item:
    name: str  # "red cube", "plate", "gripper"
    box: Box
    shape: str = ""
    colour: str = ""

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass
class Scene:
    w: int
    h: int
    table_y: int
    table: tuple[int, int, int]
    wall: tuple[int, int, int]
    gripper: Item
    receptacle: Item
    objects: list[Item]
    target: Item  # the object the instruction asks to move


# ----------------------------------------------------------------------------------------------- scene layout

def _place(rng: random.Random, taken: list[Box], bw: int, bh: int, w: int, h: int, top: int) -> Box | None:
    gap = max(4, min(w, h) // 40)  # a visible gap keeps boxes separable at low resolution
    for _ in range(200):
        x1 = rng.randint(round(0.09 * w), round(0.91 * w) - bw)  # inside the table's narrow far edge
        y1 = rng.randint(top + gap, h - gap - bh)
        box = (x1, y1, x1 + bw, y1 + bh)
        if all(box[0] >= t[2] + gap or box[2] + gap <= t[0] or box[1] >= t[3] + gap or box[3] + gap <= t[1]
               for t in taken):
            return box
    return None


def _sample_scene(rng: random.Random) -> Scene | None:
    """A random layout, or None when the objects did not fit (the caller draws again)."""
    w, h = rng.choice(SIZES)
    s = min(w, h)
    table_y = round(h * rng.uniform(0.28, 0.38))
    gw, gh = round(s * rng.uniform(0.22, 0.3)), round(h * rng.uniform(0.3, 0.45))
    gx = rng.randint(round(0.08 * w), round(0.92 * w) - gw)
    gripper = Item("gripper", (gx, 0, gx + gw, gh))
    taken = [gripper.box]
    kind = rng.choice(sorted(RECEPTACLES))
    rw = round(s * rng.uniform(0.34, 0.42))
    rbox = _place(rng, taken, rw, round(rw * rng.uniform(0.5, 0.6)), w, h, table_y)
    if rbox is None:
        return None
    taken.append(rbox)
    objects = []
    for colour in rng.sample(sorted(COLOURS), rng.randint(2, 4)):
        shape = rng.choice(SHAPES)
        size = round(s * rng.uniform(0.14, 0.22))
        box = _place(rng, taken, size, round(size * 1.15) if shape == "cup" else size, w, h, table_y)
        if box is None:
            return None
        taken.append(box)
        objects.append(Item(f"{colour} {shape}", box, shape, colour))
    return Scene(w, h, table_y, rng.choice(_TABLE_TONES), rng.choice(_WALL_TONES), gripper,
                 Item(kind, rbox, kind), objects, rng.choice(objects))


# ------------------------------------------------------------------------------------------------- rendering

def _darker(c: tuple[int, int, int], f: float = 0.7) -> tuple[int, int, int]:
    return tuple(int(v * f) for v in c)


def _cup_rim(box: Box) -> int:
    return round(0.26 * (box[3] - box[1]))


def _cup_halfwidth(box: Box, y: float) -> float:
    """Half the cup body's width at row y: it tapers from full width under the rim to 70% at the base."""
    x1, y1, x2, y2 = box
    top = y1 + _cup_rim(box) / 2
    t = min(max((y - top) / (y2 - top), 0.0), 1.0)
    return (x2 - x1) / 2 * (1 - 0.3 * t)


def _render(sc: Scene, rng: random.Random) -> Image.Image:
    w, h = sc.w, sc.h
    img = Image.new("RGB", (w, h), sc.wall)
    d = ImageDraw.Draw(img)
    lw = max(1, min(w, h) // 160)
    inset = round(0.08 * w)  # a trapezoid top suggests the camera looks down at the table
    d.polygon([(inset, sc.table_y), (w - 1 - inset, sc.table_y), (w - 1, h - 1), (0, h - 1)], fill=sc.table)
    for _ in range(rng.randint(4, 9)):  # faint wood grain: texture the model must learn to ignore
        y = rng.randint(sc.table_y + 2, h - 2)
        xi = inset * (1 - (y - sc.table_y) / (h - sc.table_y))
        d.line([(xi + 1, y), (w - 2 - xi, y)], fill=_darker(sc.table, 0.88), width=1)

    x1, y1, x2, y2 = sc.receptacle.box
    fill = RECEPTACLES[sc.receptacle.name]
    mx, my = (x2 - x1) * 0.15, (y2 - y1) * 0.15
    if sc.receptacle.name in ("bowl", "plate"):
        d.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill, outline=_darker(fill, 0.8), width=lw + 1)
    else:
        d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill, outline=_darker(fill, 0.8), width=lw + 1)
    if sc.receptacle.name == "bowl":  # hollow inside: a darker inner surface
        d.ellipse((x1 + mx, y1 + my, x2 - 1 - mx, y2 - 1 - my), fill=_darker(fill, 0.75))
    elif sc.receptacle.name == "box":
        d.rectangle((x1 + mx, y1 + my, x2 - 1 - mx, y2 - 1 - my), fill=_darker(fill, 0.75))

    for ob in sc.objects:
        x1, y1, x2, y2 = ob.box
        c = COLOURS[ob.colour]
        if ob.shape == "cube":
            d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=c, outline=_darker(c), width=lw)
        elif ob.shape == "ball":
            d.ellipse((x1, y1, x2 - 1, y2 - 1), fill=c, outline=_darker(c), width=lw)
        else:
            rim = _cup_rim(ob.box)
            inset_b = (x2 - x1) / 2 - _cup_halfwidth(ob.box, y2)
            d.polygon([(x1, y1 + rim / 2), (x2 - 1, y1 + rim / 2), (x2 - 1 - inset_b, y2 - 1), (x1 + inset_b, y2 - 1)],
                      fill=c, outline=_darker(c))
            d.ellipse((x1, y1, x2 - 1, y1 + rim), fill=_darker(c, 0.55), outline=_darker(c), width=lw)

    # Gripper: a vertical arm from the top edge, a palm and two open fingers (the "U").
    x1, _, x2, gh = sc.gripper.box
    gw, edge = x2 - x1, _darker(GRIPPER_GREY)
    palm_y, finger_y = round(gh * 0.58), round(gh * 0.70)
    arm = round(gw * 0.13)
    cx, fw = (x1 + x2) // 2, max(2, round(gw * 0.16))
    d.rectangle((cx - arm, -lw, cx + arm, palm_y), fill=GRIPPER_GREY, outline=edge, width=lw)  # enters from off-image
    d.rectangle((x1, palm_y, x2 - 1, finger_y), fill=GRIPPER_GREY, outline=edge, width=lw)
    d.rectangle((x1, finger_y - lw, x1 + fw, gh - 1), fill=GRIPPER_GREY, outline=edge, width=lw)
    d.rectangle((x2 - 1 - fw, finger_y - lw, x2 - 1, gh - 1), fill=GRIPPER_GREY, outline=edge, width=lw)
    return img


# ----------------------------------------------------------------------------------------------- ground truth

def _fmt_points(sc: Scene, pts: list[tuple[float, float]]) -> str:
    def f(v: float) -> str:
        return f"{min(max(v, 0.0), 1.0):.3f}"
    return "[" + ", ".join(f"[{f(x / sc.w)}, {f(y / sc.h)}]" for x, y in pts) + "]"


def _corners(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    return [(box[0], box[1]), (box[2], box[3])]


def _final_box(sc: Scene) -> Box:
    """The target standing on the receptacle: centred horizontally, its base a little below the rim's centre."""
    x1, y1, x2, y2 = sc.target.box
    rx, ry = sc.receptacle.centre
    base = round(ry + (sc.receptacle.box[3] - sc.receptacle.box[1]) / 4)
    left = round(rx - (x2 - x1) / 2)
    return left, base - (y2 - y1), left + (x2 - x1), base


def _contact_y(box: Box) -> float:
    return box[1] + 0.35 * (box[3] - box[1])


def _contact_points(ob: Item) -> list[tuple[float, float]]:
    """Where the fingers meet the object's silhouette at the grasp height (its left and right edges)."""
    x1, y1, x2, y2 = ob.box
    y, cx = _contact_y(ob.box), (x1 + x2) / 2
    if ob.shape == "cube":
        half = (x2 - x1) / 2
    elif ob.shape == "ball":
        r = (x2 - x1) / 2
        half = math.sqrt(max(r * r - (y - (y1 + y2) / 2) ** 2, 0.0))
    else:
        half = _cup_halfwidth(ob.box, y)
    return [(cx - half, y), (cx + half, y)]


def _trajectory(sc: Scene) -> list[tuple[float, float]]:
    """Gripper tip -> grasp point (4 points), a lift, then on to the placing point (5 points): 10 in all."""
    gx1, _, gx2, gh = sc.gripper.box
    start = ((gx1 + gx2) / 2, float(gh))
    grasp = (sc.target.centre[0], _contact_y(sc.target.box))
    fb = _final_box(sc)
    place = ((fb[0] + fb[2]) / 2, _contact_y(fb))
    lift = (grasp[0], max(grasp[1] - 0.15 * sc.h, 0.0))

    def lerp(a, b, t):
        return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t
    return ([lerp(start, grasp, t / 3) for t in range(4)] + [lift]
            + [lerp(lift, place, t / 5) for t in range(1, 6)])


_FORMAT = " Answer as {{\"{key}\": [[x1, y1], [x2, y2]]}} with coordinates normalised to [0, 1]."
_ASK = {
    "current_bbox": "What is the bounding box of the object to be manipulated?",
    "final_bbox": "Where will the manipulated object be when the task is done? Give its bounding box.",
    "contact_bbox": "Which region of the object will the gripper fingers touch? Give its bounding box.",
    "contact_point": "Where will the two gripper fingers touch the object?",
}


def _question_answer(task: str, sc: Scene, k: int, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) for one task, or None when this scene would make the answer ambiguous.

    `k` counts the records of this task so far; choice letters and yes/no answers cycle on it to stay balanced.
    """
    prep = "in" if sc.receptacle.name in _HOLLOW else "on"
    instr = f'The task is "put the {sc.target.name} {prep} the {sc.receptacle.name}". '
    t = sc.target
    if task in _ASK:
        pts = {
            "current_bbox": lambda: _corners(t.box),
            "final_bbox": lambda: _corners(_final_box(sc)),
            "contact_bbox": lambda: [(t.box[0], t.box[1] + 0.2 * (t.box[3] - t.box[1])),
                                     (t.box[2], t.box[1] + 0.5 * (t.box[3] - t.box[1]))],
            "contact_point": lambda: _contact_points(t),
        }[task]()
        return instr + _ASK[task] + _FORMAT.format(key=task), f'{{"{task}": {_fmt_points(sc, pts)}}}'
    if task == "gripper_bbox":
        q = "Where is the robot gripper? Give its bounding box." + _FORMAT.format(key=task)
        return q, f'{{"{task}": {_fmt_points(sc, _corners(sc.gripper.box))}}}'
    if task == "future_traj":
        q = (instr + "What path will the gripper follow? Answer with 10 points as "
             '{"future_traj": [[x1, y1], ..., [x10, y10]]} with coordinates normalised to [0, 1].')
        return q, f'{{"{task}": {_fmt_points(sc, _trajectory(sc))}}}'

    if task == "choice":
        # One fixed option order, so the letter is a function of what the image shows: which container, the
        # largest single-colour area in the scene, is what the tiny random vision tower separates best (a frozen
        # linear-MLP probe: 94% on containers, 33-43% on "which colour is missing / nearest the gripper").
        # Shuffled options would add a second hop (find the option, then its letter).
        options = sorted(RECEPTACLES)
        if sc.receptacle.name != options[k % 4]:  # letters stay balanced; the caller redraws the scene
            return None
        lines = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(options))
        return (f"Which container is on the table?\n{lines}\nAnswer with the option's letter from the given "
                "choices directly.", "ABCD"[k % 4])

    want_yes = k % 2 == 0
    if rng.random() < 0.5:
        pairs = [(a, b) for a in sc.objects for b in sc.objects if abs(a.centre[0] - b.centre[0]) >= 0.1 * sc.w]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        if (a.centre[0] < b.centre[0]) != want_yes:
            a, b = b, a
        q = f"Is the {a.name} to the left of the {b.name}?"
    else:
        other = [r for r in sorted(RECEPTACLES) if r != sc.receptacle.name]
        q = f"Is there a {sc.receptacle.name if want_yes else rng.choice(other)} on the table?"
    return q, "Yes" if want_yes else "No"


# -------------------------------------------------------------------------------------------------- writing

def _example(i: int, seed: int, cycle: tuple[str, ...] = CYCLE) -> tuple[dict, Image.Image]:
    task = cycle[i % len(cycle)]
    k = i // len(cycle) * cycle.count(task) + cycle[: i % len(cycle)].count(task)  # earlier records of this task
    # One generator per record: record i is the same whatever n is, and nothing touches global RNG state.
    rng = random.Random(f"lora_manip.synth:{seed}:{i}")
    qa = None
    while qa is None:  # redraw until the layout fits and the question has a clear answer
        sc = _sample_scene(rng)
        qa = _question_answer(task, sc, k, rng) if sc else None
    rec = {
        "id": f"synth_{i:06d}", "task": task, "images": [f"images/{i:06d}.png"], "width": sc.w, "height": sc.h,
        "conversations": [{"from": "human", "value": "<image>\n" + qa[0]}, {"from": "gpt", "value": qa[1]}],
    }
    return rec, _render(sc, rng)


def write_synth_dataset(out_dir: str | Path, n: int, seed: int = 0, val_fraction: float = 0.1,
                        tasks: list[str] | None = None) -> dict:
    """Render scenes and write OUT/images/*.png, OUT/train.json, OUT/val.json. Returns a summary dict
    {"train": n_train, "val": n_val, "tasks": {task: count}, "out_dir": str}. `tasks` keeps only those tasks of
    the mixture (in CYCLE's proportions), e.g. a prompt set for GRPO on one task. OUT is new, empty or one this
    writer made (outputs/: never a folder of the user's, whatever is in it); a failure leaves nothing behind."""
    out = check_folder(out_dir, "synth", flag="OUT")  # resolved once; a folder lora-manip did not make is refused
    unknown = sorted(set(tasks or ()) - set(TASKS))
    if unknown or tasks == []:
        raise UserError(f"synthetic tasks {unknown or tasks}: choose one or more of {', '.join(TASKS)}")
    cycle = tuple(t for t in CYCLE if t in tasks) if tasks else CYCLE
    if not isinstance(n, int) or n < 1:
        raise UserError(f"the number of synthetic records must be a positive integer, got {n!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if (out / "train.json").exists() or (out / "val.json").exists():
        raise UserError(f"{out} already holds a dataset (train.json/val.json); choose an empty output folder")
    n_val = round(n * val_fraction)
    if n >= 2 and val_fraction > 0:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)  # always leave something to train on
    val_ids = set(random.Random(f"lora_manip.synth.split:{seed}").sample(range(n), n_val))

    train, val, counts = [], [], {t: 0 for t in TASKS if t in cycle}
    claim = claim_folder(out, "synth")
    try:
        cleanup_partials(out / "images")
        # The images folder appears whole or not at all. Replacing one that is there is safe: it lies in this
        # writer's folder, and without train.json and val.json (refused above) it is an interrupted run's.
        with atomic_dir(out / "images", force=True, kind="synth") as images:
            for i in range(n):
                rec, img = _example(i, seed, cycle)
                img.save(images / Path(rec["images"][0]).name, format="PNG")
                (val if i in val_ids else train).append(rec)
                counts[rec["task"]] += 1
        # train.json last: its presence marks a complete dataset, so an interrupted run can simply be repeated.
        atomic_write_json(out / "val.json", val)
        atomic_write_json(out / "train.json", train)
    except BaseException:
        if claim.new:
            claim.undo()
        raise
    return {"train": len(train), "val": len(val), "tasks": counts, "out_dir": str(out)}
