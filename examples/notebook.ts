/**
 * Notebook-style work on one thread: run a pipeline once, then look inside it, try a change to one step
 * without writing anything, and rerun only the tail of the pipeline for real.
 *
 *   npx tsx examples/notebook.ts
 *
 * The pipeline is graphs/moral-video.ts (six steps, an offline stand-in model, so no API key is needed).
 * The run goes into a fresh temporary file store, or into the store `CAIRN_STORE` names if it is set
 * (`file:<dir>`, `sqlite:<path>` or `postgres://…`). The store is left in place at the end so that the
 * printed `cairn history` command can show what this script did.
 */
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { open, run } from "cairn";
import moralVideo from "../graphs/moral-video.ts";

const store = process.env.CAIRN_STORE || `file:${join(await mkdtemp(join(tmpdir(), "cairn-notebook-")), "store")}`;

// 1. Run the whole pipeline once. `input` is laid over the workflow's default input (a topic and a
//    moral); delayMs makes each stand-in model call take 5 ms. Every finished step is checkpointed.
const first = await run(moralVideo, { input: { delayMs: 5 }, store });
console.log(`Ran thread ${first.thread} (${first.tasksRun} tasks) into ${first.store}`);

// 2. Open the thread. The handle reads the thread's history and states, and can run steps; its step
//    names are typed, so `thread.stateBefore("story_generatr")` would not compile.
const thread = await open(moralVideo, { thread: first.thread, store });
try {
  // 3. The history: one checkpoint per finished step ("input" and "start" are LangGraph's own first
  //    two). The fan-out step character_designer has two: its six scene tasks, then the gathering.
  const history = await thread.history();
  console.log(`\nHistory (${history.length} checkpoints):`);
  for (const [i, h] of history.entries()) {
    console.log(`  ${String(i + 1).padStart(2)}  ${h.step.padEnd(20)} ${String(h.durationMs ?? 0).padStart(4)}ms  ${h.id}`);
  }

  // 4. Load the state just before story_generator ran: the analysed brief and the research notes,
  //    exactly what the step saw. The story it wrote is in the state after it.
  const before = await thread.stateBefore("story_generator");
  const after = await thread.stateAfter("story_generator");
  console.log(`\nBefore story_generator: moral "${before.moral}", ${before.research?.length ?? 0} research notes`);
  console.log(`  fields: ${Object.keys(before).join(", ")}`);

  // 5. Try the step on a changed state. tryStep runs the step function alone, with no graph and no
  //    store: it returns the update the step would make and writes nothing. This is the cheap way to
  //    iterate on a prompt or an input before paying for a real rerun.
  const draft = await thread.tryStep("story_generator", { ...before, moral: "kindness matters" });
  const afterTry = await thread.history();
  console.log(`\ntryStep("story_generator") with moral "kindness matters":`);
  console.log(`  old story: ${after.story?.text.slice(0, 80)}`);
  console.log(`  new story: ${draft.story?.text.slice(0, 80)}`);
  console.log(`  checkpoints before tryStep: ${history.length}, after: ${afterTry.length} (nothing written)`);

  // 6. Rerun for real from a step: video_assembler and everything after it run again, from the state
  //    before it; the five earlier steps do not. This forks the thread: the new checkpoints ("restart:…"
  //    and the step's) point back into history, and the old branch stays, so the earlier result can
  //    still be inspected or resumed from (`cairn resume … --checkpoint <id>`).
  const rerun = await thread.continueFrom("video_assembler");
  const afterRerun = await thread.history();
  console.log(`\ncontinueFrom("video_assembler"): ${rerun.status}, ${rerun.tasksRun} task(s) run, video of ${rerun.state.video?.seconds}s`);
  console.log(`  checkpoints: ${afterTry.length} before, ${afterRerun.length} after`);
  for (const h of afterRerun.slice(afterTry.length)) console.log(`  new: ${h.step}`);

  console.log(`\nSee it from the CLI: npx cairn history ${thread.thread} --store ${thread.store.uri}`);
} finally {
  // 7. Close the store: the handle opened it from a URI, so it owns it (a handle given an opened store
  //    leaves it open for its owner).
  await thread.close();
}
