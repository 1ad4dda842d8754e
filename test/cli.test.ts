import { execFile } from "node:child_process";
import { cp, mkdir, readdir, stat, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BIN, cairn, removeWorkdirs, workdir, type CliResult } from "./helpers/cli.ts";

/*
 * The `cairn` binary as a user runs it (test/helpers/cli.ts), against a file store in a fresh working
 * directory. Each spawn loads tsx and the graph (about a second), so threads that several tests only read
 * are made once and copied.
 */

const GRAPH = "graphs/moral-video.ts";
const PLAIN_GRAPH = "test/fixtures/plain-graph.ts";
const STEPS = ["context_analyzer", "web_researcher", "story_generator", "script_segmenter", "character_designer", "video_assembler"];

afterAll(removeWorkdirs);

const storeOf = (cwd: string) => `file:${join(cwd, "store")}`;

/** Every file of the store with its size and modification time: equal before and after means nothing was written. */
async function storeFiles(cwd: string): Promise<string[]> {
  const root = join(cwd, "store");
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const path = join(dir, e.name);
      if (e.isDirectory()) await walk(path);
      else {
        const s = await stat(path);
        out.push(`${relative(root, path)} ${s.size} ${s.mtimeMs}`);
      }
    }
  };
  await walk(root);
  return out.sort();
}

async function threadIds(cwd: string): Promise<string[]> {
  return readdir(join(cwd, "store", "threads")).catch(() => []);
}

const lines = (text: string) => text.split("\n").filter((l) => l.length > 0);

/** The steps the CLI reported as finished ("✓ name  12ms"), in order. */
const finishedSteps = (stderr: string) => lines(stderr).flatMap((l) => /^✓ (\S+)\s+\d/.exec(l)?.slice(1, 2) ?? []);

const threadIdOf = (stderr: string) => /^thread (\S+) · store /m.exec(stderr)?.[1];

/** Replace what changes from run to run (temp paths, generated ids, timings) with placeholders, for snapshots. */
function scrub(text: string, cwd: string, ids: Record<string, string> = {}): string {
  let out = text.split(cwd).join("<tmp>").replace(/ after \d+(?:\.\d+)?m?s\b/g, " after <duration>");
  for (const [id, name] of Object.entries(ids)) out = out.split(id).join(name);
  return out.trimEnd();
}

interface HistoryEntry {
  id: string;
  step: string;
  source: string;
}

async function history(cwd: string, thread: string): Promise<HistoryEntry[]> {
  const r = await cairn(cwd, ["history", thread, "--store", storeOf(cwd), "--json"]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as HistoryEntry[];
}

function countByStep(entries: HistoryEntry[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const e of entries) counts[e.step] = (counts[e.step] ?? 0) + 1;
  return counts;
}

/*
 * One completed thread of the example, made once: the reading commands and the bad-input cases work on
 * copies of its store. Its final state is what an uninterrupted run produces.
 */
const DONE = "video-1";
let template: string;
let uninterrupted: Record<string, unknown>;

beforeAll(async () => {
  template = await workdir();
  const r = await cairn(template, ["run", GRAPH, "--input", '{"delayMs":5}', "--thread", DONE, "--store", storeOf(template), "--json"]);
  expect(r.code, r.stderr).toBe(0);
  uninterrupted = JSON.parse(r.stdout) as Record<string, unknown>;
}, 60_000);

/** A fresh working directory holding a copy of the completed thread's store. */
async function workdirWithDoneThread(): Promise<string> {
  const cwd = await workdir();
  await cp(join(template, "store"), join(cwd, "store"), { recursive: true });
  return cwd;
}

describe("cairn run", () => {
  it("runs the six steps, one line each, and prints the final state", async () => {
    const cwd = await workdir();
    const r = await cairn(cwd, ["run", GRAPH, "--input", '{"delayMs":5}', "--store", storeOf(cwd)]);
    expect(r.code, r.stderr).toBe(0);
    expect(threadIdOf(r.stderr)).toMatch(/^\S{4,}$/);
    expect(finishedSteps(r.stderr)).toEqual(STEPS);
    expect(r.stdout).toMatch(/^Final state:\n/);
    expect(r.stdout).toMatch(/^\s+video\s+\{"title":/m);
    expect(await threadIds(cwd)).toEqual([threadIdOf(r.stderr)]);
  }, 30_000);

  it("prints the final state as JSON on stdout with --json, step lines on stderr", async () => {
    const cwd = await workdir();
    const r = await cairn(cwd, ["run", GRAPH, "--input", '{"delayMs":5}', "--store", storeOf(cwd), "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const state = JSON.parse(r.stdout) as { video?: { seconds: number; timeline: unknown[] } };
    expect(state.video?.timeline).toHaveLength(6);
    expect(finishedSteps(r.stderr)).toEqual(STEPS);
    // Same input, same deterministic model: the same result as any other run.
    expect(state).toEqual(uninterrupted);
  }, 30_000);
});

describe("a failed step, then resume", () => {
  it("fails with the resume command, resumes without rerunning finished steps, and ends like an uninterrupted run", async () => {
    const cwd = await workdir();
    const store = storeOf(cwd);
    const failed = await cairn(cwd, ["run", GRAPH, "--input", '{"delayMs":5,"failOnceAt":"story_generator"}', "--store", store]);
    expect(failed.code, failed.stderr).toBe(1);
    const thread = threadIdOf(failed.stderr)!;
    expect(thread).toBeDefined();
    expect(finishedSteps(failed.stderr)).toEqual(["context_analyzer", "web_researcher"]);
    expect(failed.stderr).not.toMatch(/^ {4}at /m);
    const command = `cairn resume ${GRAPH} --thread ${thread} --store ${store}`;
    expect(lines(failed.stderr)).toContain(`  Continue with: ${command}`);
    expect(
      scrub(
        lines(failed.stderr)
          .filter((l) => !l.startsWith("✓") && !l.startsWith("  · ") && !l.startsWith("thread "))
          .join("\n"),
        cwd,
        { [thread]: "<thread>" },
      ),
    ).toMatchInlineSnapshot(`
      "✗ story_generator failed after <duration>: simulated rate limit (429) in story_generator — failOnceAt is set; it succeeds on the next attempt
      ✗ Step "story_generator" failed: simulated rate limit (429) in story_generator — failOnceAt is set; it succeeds on the next attempt
        2 finished steps are saved in thread <thread> (store file:<tmp>/store); they will not run again.
        This run spent $0.0016; the thread has spent $0.0016 in all.
        Continue with: cairn resume graphs/moral-video.ts --thread <thread> --store file:<tmp>/store"
    `);

    // The exact command the failure printed.
    const resumed = await cairn(cwd, command.split(" ").slice(1));
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(finishedSteps(resumed.stderr)).toEqual(["story_generator", "script_segmenter", "character_designer", "video_assembler"]);
    expect(resumed.stderr).toContain("already done: context_analyzer, web_researcher");
    expect(resumed.stdout).toMatch(/^Final state:\n/);

    // Every step has the checkpoints of one successful run: nothing before story_generator ran twice.
    const counts = countByStep(await history(cwd, thread));
    const once = countByStep(await history(template, DONE));
    expect(counts).toEqual(once);
    expect(counts).toMatchObject({ context_analyzer: 1, web_researcher: 1, story_generator: 1, video_assembler: 1 });

    const inspected = await cairn(cwd, ["inspect", thread, "--store", store, "--json"]);
    expect(inspected.code, inspected.stderr).toBe(0);
    const final = JSON.parse(inspected.stdout) as Record<string, unknown>;
    const { failOnceAt, ...rest } = final;
    expect(failOnceAt).toBe("story_generator");
    expect(rest).toEqual(uninterrupted);

    const again = await cairn(cwd, command.split(" ").slice(1));
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toContain(`Thread ${thread} already completed; nothing to do.`);
    expect(finishedSteps(again.stderr)).toEqual([]);
    expect(countByStep(await history(cwd, thread))).toEqual(once);
  }, 90_000);

  it("shows the step's stack trace only with --verbose", async () => {
    const cwd = await workdir();
    const r = await cairn(cwd, ["run", GRAPH, "--input", '{"delayMs":5,"failOnceAt":"story_generator"}', "--store", storeOf(cwd), "--verbose"]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/^ {4}at /m);
    expect(r.stderr).toContain("moral-video.ts");
  }, 30_000);
});

describe("cairn resume --from-step", () => {
  it("reruns only the named step and what follows it, keeping the old branch", async () => {
    const cwd = await workdirWithDoneThread();
    const before = countByStep(await history(cwd, DONE));
    const r = await cairn(cwd, ["resume", GRAPH, "--thread", DONE, "--from-step", "video_assembler", "--store", storeOf(cwd)]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain("↺ restarting from video_assembler");
    expect(finishedSteps(r.stderr)).toEqual(["video_assembler"]);
    const after = await history(cwd, DONE);
    expect(after.map((e) => e.step).slice(-2)).toEqual(["restart:video_assembler", "video_assembler"]);
    expect(countByStep(after)).toEqual({ ...before, "restart:video_assembler": 1, video_assembler: before.video_assembler! + 1 });
  }, 60_000);
});

describe("reading a thread", () => {
  it("lists threads, history, and state after a step or at a checkpoint", async () => {
    const cwd = await workdirWithDoneThread();
    const store = storeOf(cwd);

    const threads = await cairn(cwd, ["threads", "--store", store, "--json"]);
    expect(threads.code, threads.stderr).toBe(0);
    expect(JSON.parse(threads.stdout)).toEqual([expect.objectContaining({ thread: DONE, status: "completed", lastStep: "video_assembler" })]);

    const table = await cairn(cwd, ["history", DONE, "--store", store]);
    expect(table.code, table.stderr).toBe(0);
    for (const step of STEPS) expect(table.stdout).toMatch(new RegExp(`^\\d+\\s+[0-9a-f-]{36}\\s+${step}\\s`, "m"));
    expect(table.stdout).toMatch(/^status: completed · spent \$0\.0071 \(492 in \+ 376 out tokens, 10 model calls\)$/m);

    const entries = await history(cwd, DONE);
    expect(entries.map((e) => e.step)).toEqual(["input", "start", ...STEPS.slice(0, 5), "character_designer", "video_assembler"]);

    const afterStory = await cairn(cwd, ["inspect", DONE, "--step", "story_generator", "--store", store, "--json"]);
    expect(afterStory.code, afterStory.stderr).toBe(0);
    const values = JSON.parse(afterStory.stdout) as Record<string, unknown>;
    expect(values.story).toEqual(uninterrupted.story);
    expect(values.video).toBeUndefined();

    const researched = entries.find((e) => e.step === "web_researcher")!;
    const atCheckpoint = await cairn(cwd, ["inspect", DONE, "--checkpoint", researched.id, "--store", store]);
    expect(atCheckpoint.code, atCheckpoint.stderr).toBe(0);
    expect(lines(atCheckpoint.stdout)[0]).toBe(`thread ${DONE} · checkpoint ${researched.id} · after step web_researcher · ${lines(atCheckpoint.stdout)[0]!.split(" · ").pop()}`);
    expect(atCheckpoint.stdout).toMatch(/^\s+research\s+\[2 items\]/m);
    expect(atCheckpoint.stdout).not.toMatch(/^\s+story\s/m);
  }, 60_000);

  // A checkpoint's raw channels also hold LangGraph's routing (`branch:to:<node>`, `__pregel_tasks`) and
  // cairn's own records; inspect shows none of them (they leaked before d8c2baa).
  it("inspect --json prints only the state's fields", async () => {
    const cwd = await workdirWithDoneThread();
    const r = await cairn(cwd, ["inspect", DONE, "--step", "story_generator", "--store", storeOf(cwd), "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const extra = Object.keys(JSON.parse(r.stdout) as object).filter((k) => !(k in uninterrupted));
    expect(extra).toEqual([]);
  }, 30_000);
});

describe("bad input: exit 2, one line naming the value and the fix, nothing written", () => {
  interface BadCase {
    name: string;
    args: (store: string) => string[];
    /** Words the message must contain: the bad value and the way out. */
    says: string[];
    setup?: (cwd: string) => Promise<void>;
    /** zod's prettified issues take several lines (STYLE 12); every other message is one line. */
    multiline?: boolean;
  }
  const CASES: BadCase[] = [
    {
      name: "unknown step for --from-step",
      args: (s) => ["resume", GRAPH, "--thread", DONE, "--from-step", "story_writer", "--store", s],
      says: ['"story_writer"', `Valid steps: ${STEPS.join(", ")}`],
    },
    {
      name: "unknown thread for resume",
      args: (s) => ["resume", GRAPH, "--thread", "ghost", "--store", s],
      says: ['"ghost"', "cairn threads --store"],
    },
    { name: "unknown thread for history", args: (s) => ["history", "ghost", "--store", s], says: ['"ghost"', "cairn threads --store"] },
    { name: "unknown thread for inspect", args: (s) => ["inspect", "ghost", "--store", s], says: ['"ghost"', "cairn threads --store"] },
    {
      name: "unknown checkpoint for resume",
      args: (s) => ["resume", GRAPH, "--thread", DONE, "--checkpoint", "1f0-nope", "--store", s],
      says: ['"1f0-nope"', `cairn history ${DONE} --store`],
    },
    {
      name: "unknown checkpoint for inspect",
      args: (s) => ["inspect", DONE, "--checkpoint", "1f0-nope", "--store", s],
      says: ['"1f0-nope"', `cairn history ${DONE} --store`],
    },
    {
      name: "--from-step with --checkpoint",
      args: (s) => ["resume", GRAPH, "--thread", DONE, "--from-step", "x", "--checkpoint", "y", "--store", s],
      says: ["--from-step", "--checkpoint", "cannot be used together", "one of them"],
    },
    {
      name: "a graph file that does not exist",
      args: (s) => ["run", "graphs/missing.ts", "--store", s],
      says: ['"graphs/missing.ts"', "does not exist", "default export"],
    },
    {
      name: "a module that exports no graph",
      setup: async (cwd) => {
        await mkdir(join(cwd, "esm"));
        await writeFile(join(cwd, "esm", "package.json"), '{"type":"module"}\n');
        await writeFile(join(cwd, "esm", "no-graph.ts"), "export default 42;\n");
      },
      args: (s) => ["run", "esm/no-graph.ts", "--store", s],
      says: ['"esm/no-graph.ts"', "exports no graph", "a number", "export default workflow("],
    },
    {
      name: "an unsupported store URI",
      args: () => ["run", GRAPH, "--store", "mysql://x"],
      says: ['"mysql://x"', "file:<dir>", "sqlite:<path>", "postgres://"],
    },
    {
      name: "malformed --input JSON",
      args: (s) => ["run", GRAPH, "--input", "{bad", "--store", s],
      says: ["--input is not valid JSON", `--input '{"topic":"honesty"}'`, "--input @"],
    },
    {
      name: "--input @ a missing file",
      args: (s) => ["run", GRAPH, "--input", "@missing.json", "--store", s],
      says: ['"missing.json"', "cannot be read", "--input @"],
    },
    {
      name: "an input that fails the schema",
      args: (s) => ["run", GRAPH, "--input", '{"sceneCount":0}', "--store", s],
      says: ['"moral-video"', "sceneCount", ">=1"],
      multiline: true,
    },
    {
      name: "run with an existing --thread",
      args: (s) => ["run", GRAPH, "--thread", DONE, "--store", s],
      says: [`"${DONE}"`, "already exists", "cairn resume", "another --thread"],
    },
    { name: "an unknown flag", args: (s) => ["run", GRAPH, "--frobnicate", "--store", s], says: ["--frobnicate", "cairn run --help"] },
    { name: "an unknown command", args: () => ["frobnicate"], says: ['"frobnicate"', "run, resume, threads, history, inspect", "cairn --help"] },
  ];

  const snapshots: Record<string, string> = {};

  for (const c of CASES) {
    it(c.name, async () => {
      const cwd = await workdirWithDoneThread();
      await c.setup?.(cwd);
      const before = await storeFiles(cwd);
      const r = await cairn(cwd, c.args(storeOf(cwd)));
      expect(r.code, r.stderr).toBe(2);
      expect(r.stdout).toBe("");
      const message = lines(r.stderr);
      if (!c.multiline) expect(message).toHaveLength(1);
      expect(message[0]).toMatch(/^cairn: /);
      for (const words of c.says) expect(r.stderr).toContain(words);
      expect(r.stderr).not.toMatch(/^ {4}at /m);
      expect(await threadIds(cwd)).toEqual([DONE]);
      expect(await storeFiles(cwd)).toEqual(before);
      snapshots[c.name] = scrub(r.stderr, cwd);
    }, 30_000);
  }

  it("pins the most used messages", () => {
    expect(snapshots["unknown step for --from-step"]).toMatchInlineSnapshot(
      `"cairn: Unknown step "story_writer" in workflow "moral-video". Valid steps: context_analyzer, web_researcher, story_generator, script_segmenter, character_designer, video_assembler."`,
    );
    expect(snapshots["unknown thread for resume"]).toMatchInlineSnapshot(
      `"cairn: No thread "ghost" in store file:<tmp>/store. List the threads with: cairn threads --store file:<tmp>/store"`,
    );
    expect(snapshots["--from-step with --checkpoint"]).toMatchInlineSnapshot(
      `"cairn: --from-step and --checkpoint cannot be used together: --from-step "x" restarts before a step, --checkpoint "y" continues from one checkpoint. Pass one of them."`,
    );
  });
});

describe("graph files", () => {
  // BUG (bin/cairn.js): only tsx's ESM hooks are registered, so a .ts graph in a folder whose package.json
  // is not `"type": "module"` (or that has none, like this temp dir and most TypeScript projects) fails
  // to load with Node's "Cannot require() ES Module … in a cycle" instead of being read.
  it("reads a graph file outside an ESM package", async () => {
    const cwd = await workdir();
    await writeFile(join(cwd, "no-graph.ts"), "export default 42;\n");
    const r = await cairn(cwd, ["run", "no-graph.ts", "--store", storeOf(cwd)]);
    expect(r.code, r.stderr).toBe(2);
    expect(lines(r.stderr)).toEqual([
      'cairn: "no-graph.ts" exports no graph: its default export is a number. Export default a cairn workflow (`export default workflow(...)`) or a LangGraph StateGraph.',
    ]);
    expect(await threadIds(cwd)).toEqual([]);
  }, 30_000);
});

describe("a plain LangGraph StateGraph", () => {
  it("fails with the resume command, resumes, and labels checkpoints with node names", async () => {
    const cwd = await workdir();
    const store = storeOf(cwd);
    const env = { FAIL_ONCE_FILE: join(cwd, "write_draft.failed") };
    const failed = await cairn(cwd, ["run", PLAIN_GRAPH, "--input", '{"topic":"tides"}', "--store", store], env);
    expect(failed.code, failed.stderr).toBe(1);
    const thread = threadIdOf(failed.stderr)!;
    expect(failed.stderr).toContain('✗ Step "write_draft" failed: simulated outage in write_draft');
    expect(finishedSteps(failed.stderr)).toEqual(["make_outline"]);
    const command = `cairn resume ${PLAIN_GRAPH} --thread ${thread} --store ${store}`;
    expect(lines(failed.stderr)).toContain(`  Continue with: ${command}`);

    const resumed = await cairn(cwd, command.split(" ").slice(1), env);
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(finishedSteps(resumed.stderr)).toEqual(["write_draft", "polish"]);
    expect(resumed.stderr).toContain("already done: make_outline");
    expect(resumed.stdout).toMatch(/^\s+final\s+"DRAFT FROM OUTLINE OF TIDES"$/m);
    // The reducer field holds each node once: make_outline's update was not applied a second time.
    expect(resumed.stdout).toMatch(/^\s+log\s+\[3 items\] "make_outline"/m);

    const table = await cairn(cwd, ["history", thread, "--store", store]);
    expect(table.code, table.stderr).toBe(0);
    const steps = lines(table.stdout)
      .slice(1, -1)
      .map((l) => l.split(/\s+/)[2]);
    expect(steps).toEqual(["input", "start", "make_outline", "write_draft", "polish"]);
    expect(lines(table.stdout).at(-1)).toBe("status: completed");
  }, 60_000);
});

describe("the printed resume command works as printed, whatever the thread id", () => {
  it("quotes a thread id that starts with a dash and holds a space and a quote, and a shell runs it", async () => {
    const cwd = await workdir();
    const store = storeOf(cwd);
    const thread = "-my run's 1";
    const failed = await cairn(cwd, ["run", GRAPH, `--thread=${thread}`, "--input", '{"delayMs":5,"failOnceAt":"web_researcher"}', "--store", store]);
    expect(failed.code, failed.stderr).toBe(1);
    const printed = lines(failed.stderr).find((l) => l.startsWith("  Continue with: "))!.slice("  Continue with: ".length);
    expect(printed).toBe(`cairn resume ${GRAPH} --thread='-my run'\\''s 1' --store ${store}`);
    // Run it through a real shell, with `cairn` standing for the binary.
    const resumed = await new Promise<CliResult>((resolve) => {
      execFile("/bin/sh", ["-c", `cairn() { "${process.execPath}" "${BIN}" "$@"; }; ${printed}`], { cwd, timeout: 30_000 }, (error, stdout, stderr) =>
        resolve({ code: error ? Number(error.code) : 0, stdout, stderr }),
      );
    });
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(resumed.stderr).toContain("already done: context_analyzer");
  }, 60_000);
});
