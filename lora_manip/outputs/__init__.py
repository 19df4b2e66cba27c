"""The one output guard: what every command that writes (train, merge, convert, eval, score, predict --draw, data
synth, data normalize, tiny-model) checks and does before it deletes, replaces or writes anything.

- One path. An output is resolved once (`~` expanded, symbolic links followed: `resolve`) and every writer uses
  that path, so a link is acted on at its target and messages name what was really touched.
- Ownership before destruction. A folder the kit creates, or finds empty, gets a marker (`.lora-manip.json`,
  created exclusively and never through a link) naming the kit and the kind of output in it (a training run, a
  merged checkpoint, ...). A folder is written into, replaced, moved aside or deleted only when its marker names a
  kind the command writes; a folder without one is refused whatever the flag, listing a few of its files
  (`check_folder`). Folders the kit writes inside its own (overlays/, images/) are covered by their parent's
  marker. A single file (`data normalize`'s output, `predict --draw`) is replaced only when its sidecar
  (`.NAME.lora-manip.json`) says the kit wrote it and it has not changed since (`check_file`, `write_file`).
- Never over or inside an input (`guard_inputs`; paths compared resolved).
- Nothing half-written under the real name: `atomic_dir` builds a folder as `.NAME.XXXXXXXX.partial` beside the
  output and renames it into place; `cleanup_partials` removes what a killed command left (only the kit's own);
  `move_aside` takes an old run out of the way in one rename.
- Nothing left behind by a failure: `claim_folder` records what it made, and `Claim.undo` takes it back.
- One owner at a time (fsutil.output_lock) while an output is written: `results_folder` (eval, score) and
  `owned_output` (merge, convert) hold it around the checks above.
"""

from .folders import (atomic_dir, check_results, cleanup_partials, holds_cwd, move_aside, owned_output,
                      partial_dir, results_folder)
from .guard import (KINDS, MARKER, RESULTS, Claim, check_file, check_folder, check_owned, check_replace,
                    claim_folder, contents, guard_inputs, kind_of, listing, read_marker, remove_path, resolve,
                    shown, write_cache_file, write_file, write_marker, wrote_file)

__all__ = ["atomic_dir", "check_results", "cleanup_partials", "holds_cwd", "move_aside", "owned_output",
           "partial_dir", "results_folder", "KINDS", "MARKER", "RESULTS", "Claim", "check_file", "check_folder",
           "check_owned", "check_replace", "claim_folder", "contents", "guard_inputs", "kind_of", "listing",
           "read_marker", "remove_path", "resolve", "shown", "write_cache_file", "write_file", "write_marker",
           "wrote_file"]
