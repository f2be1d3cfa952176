"""scripts/device/gpu-check.sh without a GPU (GPT2FT_GPU_DRY_RUN=1): the device tool returns at
most 8 files from $OUT, so the script must leave no more there on any path; every part must
have its row in summary.txt within the budget; a budget too small for all parts lists the
rest as not run; the offload part runs only with 90 s left, which a dry run (every limit
counted as spent) does not leave."""
import os
import re
import subprocess
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "device", "gpu-check.sh")
PARTS = ["gpu tests", "packed documents vs plain text", "bench gpt2 vs HF Trainer", "plan --measure",
         "8-bit AdamW step", "offload gpt2-xl"]


def dry_run(out, budget=None):
    env = dict(os.environ, OUT=out, GPT2FT_GPU_DRY_RUN="1")
    if budget is not None:
        env["GPT2FT_GPU_BUDGET_S"] = str(budget)
    r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"gpu-check.sh exit {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    with open(os.path.join(out, "summary.txt")) as f:
        return f.read()


class DeviceCheckTest(unittest.TestCase):
    def test_at_most_eight_files_and_every_part_within_the_budget(self):
        with tempfile.TemporaryDirectory() as out:
            summary = dry_run(out)
            files = sorted(os.listdir(out))
            print(f"files under $OUT: {len(files)}: {', '.join(files)}")
            self.assertLessEqual(len(files), 8, files)
            for part in PARTS:
                row = next((line for line in summary.splitlines() if line.startswith(f"| {part}")), None)
                self.assertIsNotNone(row, f"no summary row for {part}:\n{summary}")
                if part == "offload gpt2-xl":
                    self.assertRegex(row, r"dry run|not run \(\d+s left, it needs 90s\)")
                else:
                    self.assertIn("dry run", row)
                print(row)
            planned = int(re.search(r"planned at most (\d+)s", summary).group(1))
            self.assertLessEqual(planned, 540)
            for section in ["### gpu tests", "### packed documents", "### benchmark", "### planner vs measured",
                            "### optimizer step", "### offload"]:
                self.assertIn(section, summary)

    def test_a_small_budget_lists_the_parts_it_does_not_reach(self):
        with tempfile.TemporaryDirectory() as out:
            summary = dry_run(out, budget=300)
            self.assertIn("| gpu tests | dry run", summary)
            self.assertRegex(summary, r"\| offload gpt2-xl \| not run")
            self.assertLessEqual(len(os.listdir(out)), 8)


if __name__ == "__main__":
    unittest.main()
