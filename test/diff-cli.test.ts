/**
 * `cairn diff` as a person at a terminal meets it, through the `cairn` binary (test/helpers/cli.ts), on
 * the file store, SQLite and Postgres. Each store holds a thread of test/fixtures/diff-graph.ts run once,
 * then rerun from its first step under DIFF_VARIANT=b (a second branch whose state differs in known
 * ways), and a second thread run with another topic.
 */
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openStore, readHistory, resume, run, type HistoryEntry } from "cairn";
import story from "./fixtures/diff-graph.ts";
import { BIN, cairn, childEnv, removeWorkdirs, workdir, type CliResult } from "./helpers/cli.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

const GRAPH = "test/fixtures/diff-graph.ts";
const pg = await requirePostgresInCI();

afterAll(removeWorkdirs);

/** A thread rerun from a step, and another thread: the two branches' last checkpoints, in each store. */
interface Fixture {
  cwd: string;
  store: string;
  /** Checkpoint ids of thread "story": the last of the first branch, the last of the rerun. */
  first: string;
  second: string;
  history: HistoryEntry[];
}

/**
 * The threads, made with `cairn run` and `cairn resume --from-step` on the file store; through the API
 * (the same runner, in this process, without a spawn per call) on the database stores.
 */
async function makeFixture(store: (cwd: string) => string, via: "cli" | "api"): Promise<Fixture> {
  const cwd = await workdir("cairn-diff-");
  const uri = store(cwd);
  if (via === "cli") {
    const ok = (r: CliResult) => expect(r.code, r.stderr).toBe(0);
    ok(await cairn(cwd, ["run", GRAPH, "--thread", "story", "--store", uri]));
    ok(await cairn(cwd, ["resume", GRAPH, "--thread", "story", "--from-step", "write", "--store", uri], { DIFF_VARIANT: "b" }));
    ok(await cairn(cwd, ["run", GRAPH, "--thread", "harbour", "--input", '{"topic":"a harbour master"}', "--store", uri]));
  } else {
    await run(story, { thread: "story", store: uri });
    process.env.DIFF_VARIANT = "b";
    try {
      await resume(story, { thread: "story", fromStep: "write", store: uri });
    } finally {
      delete process.env.DIFF_VARIANT;
    }
    await run(story, { thread: "harbour", input: { topic: "a harbour master" }, store: uri });
  }
  const opened = await openStore(uri);
  try {
    const history = await readHistory(opened.saver, "story");
    const summaries = history.filter((e) => e.step === "summarize");
    expect(summaries).toHaveLength(2);
    return { cwd, store: uri, first: summaries[0]!.id, second: summaries[1]!.id, history };
  } finally {
    await opened.close();
  }
}

let fileFixture: Promise<Fixture> | undefined;
/** The file store's threads, made once for every test that reads them. */
const fileStore = () => (fileFixture ??= makeFixture((cwd) => `file:${join(cwd, "store")}`, "cli"));

/** Checkpoint ids as names, times as <ts>. */
function scrub(text: string, ids: Record<string, string>): string {
  let out = text.replace(/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z/g, "<ts>");
  for (const [id, name] of Object.entries(ids)) out = out.split(id).join(name);
  return out.trimEnd();
}

const BRANCHES = `a: thread story · checkpoint <first> · after summarize · <ts>
b: thread story · checkpoint <second> · after summarize · <ts>
added 1 field: notes · changed 4 fields: draft, scenes, stats, title

~ draft: 5 lines → 6 lines
    @@ -1,5 +1,6 @@
     The story of a lighthouse keeper.
     The lamp is lit at dusk.
    -A storm comes in from the west.
    +A gale comes in from the north.
     A ship is in trouble near the rocks.
    +The keeper rows out to meet it.
     At dawn the sea is calm again.
+ notes: "rewritten with a gale"
~ scenes: 3 items → 4 items (+1 added, 1 changed)
~ scenes[1].prompt: the [-storm-]{+gale+} over the rocks, a lighthouse keeper
~ scenes[1].image: the-storm-over-the-rocks.png sha256:191ef9bb8c5f → the-gale-over-the-rocks.png sha256:d30402dca40d
+ scenes[3]: {prompt: "the rowing boat, a lighthouse keeper", image: artifact the-rowing-boat.png sha256:a92bbbce1a6e}
~ stats.words: 34 → 41
~ stats.scenes: 3 → 4
~ title: The keeper and the [-storm-]{+gale+}: a lighthouse keeper`;

interface JsonDiff {
  a: { thread: string; checkpoint: string; step: string; ts: string };
  b: { thread: string; checkpoint: string; step: string; ts: string };
  changes: { path: string; segments: (string | number)[]; kind: string; before?: unknown; after?: unknown }[];
}

const STORES: [string, () => Promise<Fixture>, boolean][] = [
  ["file store", fileStore, true],
  ["SQLite", () => makeFixture((cwd) => `sqlite:${join(cwd, "cairn.db")}`, "api"), true],
  ["Postgres", () => makeFixture(() => postgresUri(schema), "api"), pg.ok],
];
const schema = uniqueSchema("cairn_diff");
afterAll(async () => {
  if (pg.ok) await dropSchema(schema);
});

for (const [name, fixture, available] of STORES) {
  describe.skipIf(!available)(`cairn diff on the ${name}`, () => {
    let f: Fixture;
    beforeAll(async () => {
      f = await fixture();
    }, 120_000);
    const diff = (...args: string[]) => cairn(f.cwd, ["diff", ...args, "--store", f.store]);

    it("between the branches a --from-step rerun left: strings as line and word diffs, items, artifacts, fields added", async () => {
      const r = await diff("story", f.first, f.second);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toBe("");
      expect(scrub(r.stdout, { [f.first]: "<first>", [f.second]: "<second>" })).toBe(BRANCHES);
    });

    it("--step alone: what the fan-out changed, before its first checkpoint vs after its gathering, as JSON", async () => {
      const r = await diff("story", "--step", "illustrate", "--json");
      expect(r.code, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout) as JsonDiff;
      const branch = f.history.slice(-4);
      expect(branch.map((e) => e.step)).toEqual(["write", "illustrate", "illustrate", "summarize"]);
      expect(out.a).toEqual({ thread: "story", checkpoint: branch[0]!.id, step: "write", ts: branch[0]!.ts });
      expect(out.b).toEqual({ thread: "story", checkpoint: branch[2]!.id, step: "illustrate", ts: branch[2]!.ts });
      expect(out.changes.map((c) => [c.kind, c.path, c.segments])).toEqual([0, 1, 2, 3].map((i) => ["added", `scenes[${i}]`, ["scenes", i]]));
      expect(out.changes[3]).not.toHaveProperty("before");
      expect(out.changes[3]!.after).toMatchObject({ prompt: "the rowing boat, a lighthouse keeper", image: { kind: "cairn.artifact", name: "the-rowing-boat.png" } });
    });
  });
}

// -------------------------------------------------------------------------------------------------

describe("cairn diff: forms, identical states, colour and bad input (file store)", () => {
  let f: Fixture;
  beforeAll(async () => {
    f = await fileStore();
  }, 120_000);
  const diff = (...args: string[]) => cairn(f.cwd, ["diff", ...args, "--store", f.store]);

  it("<thread>@<checkpoint> against a thread's latest state; the same state twice says so and exits 0", async () => {
    const [changed, same, sameJson] = await Promise.all([
      diff(`story@${f.first}`, "story"),
      diff(`story@${f.second}`, "story"),
      diff("story", "story", "--json"),
    ]);
    expect(changed.code, changed.stderr).toBe(0);
    const ids = { [f.first]: "<first>", [f.second]: "<second>" };
    expect(scrub(changed.stdout, ids)).toBe(BRANCHES.replace("b: thread story · checkpoint <second>", "b: thread story · latest · checkpoint <second>"));
    expect(same.code, same.stderr).toBe(0);
    expect(scrub(same.stdout, ids)).toBe(
      `a: thread story · checkpoint <second> · after summarize · <ts>\nb: thread story · latest · checkpoint <second> · after summarize · <ts>\nNo differences: the two states are identical.`,
    );
    expect(sameJson.code, sameJson.stderr).toBe(0);
    expect((JSON.parse(sameJson.stdout) as JsonDiff).changes).toEqual([]);
  });

  it("across threads: the state after the same step in each", async () => {
    const r = await diff("story", "harbour", "--step", "write");
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.split("\n");
    expect(lines[0]).toMatch(/^a: thread story · after step write · checkpoint \S+ · \S+$/);
    expect(lines[1]).toMatch(/^b: thread harbour · after step write · checkpoint \S+ · \S+$/);
    expect(lines[2]).toBe("changed 3 fields: draft, title, topic");
    expect(lines).toContain('~ topic: "a lighthouse keeper" → "a harbour master"');
    expect(lines).toContain("~ title: The keeper and the [-gale-]{+storm+}: a [-lighthouse keeper-]{+harbour master+}");
    expect(lines.slice(lines.indexOf("~ draft: 6 lines → 5 lines") + 1, lines.indexOf("~ draft: 6 lines → 5 lines") + 4)).toEqual([
      "    @@ -1,6 +1,5 @@",
      "    -The story of a lighthouse keeper.",
      "    +The story of a harbour master.",
    ]);
  });

  it("--step a --step b: the state after one step vs after another on the current branch", async () => {
    const r = await diff("story", "--step", "write", "--step", "summarize");
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.split("\n").slice(2, 4)).toEqual(["added 2 fields: notes, stats · changed 1 field: scenes", ""]);
    expect(r.stdout).toContain("~ scenes: 0 items → 4 items (+4 appended)\n+ scenes[0]: ");
    expect(r.stdout).toContain("\n+ stats: {words: 41, scenes: 4}\n");
    expect(r.stdout).toContain("Long values are shortened (…); add --json to print them in full.");
  });

  it("bad input: a CairnError naming the value and the fix, exit 2, nothing on stdout", async () => {
    const cases: [string[], string][] = [
      [["nope", "--step", "write"], `cairn: No thread "nope" in store ${f.store}. List the threads with: cairn threads --store ${f.store}`],
      [["story", f.first, "bogus"], `cairn: No checkpoint "bogus" in thread "story". List its checkpoints with: cairn history story --store ${f.store}`],
      [["story", "--step", "publish"], `cairn: Step "publish" has no checkpoint in thread "story". Steps with checkpoints: write, illustrate, summarize.`],
      [
        ["story", f.first, f.second, "--step", "write"],
        `cairn: --step write cannot be combined with checkpoints ${f.first} and ${f.second}: name the states by checkpoint or by step, not both. Write: cairn diff <thread> <checkpoint-a> <checkpoint-b>, cairn diff <thread> --step <a> [--step <b>], or cairn diff <thread-a>[@<id>] <thread-b>[@<id>] (see cairn diff --help)`,
      ],
      [
        [`story@${f.first}`, "harbour", "--step", "write"],
        `cairn: --step write cannot be combined with checkpoint ${f.first} of thread "story": name the states by checkpoint or by step, not both. Write: cairn diff <thread> <checkpoint-a> <checkpoint-b>, cairn diff <thread> --step <a> [--step <b>], or cairn diff <thread-a>[@<id>] <thread-b>[@<id>] (see cairn diff --help)`,
      ],
      [
        ["story", f.first],
        `cairn: "${f.first}" is a checkpoint of thread "story", not a thread: two arguments name two states, each <thread> or <thread>@<checkpoint-id>. To compare it with the latest state write: cairn diff story@${f.first} story; with another checkpoint: cairn diff story ${f.first} <checkpoint-id>.`,
      ],
      [
        ["story"],
        `cairn: cairn diff needs two states of thread "story" to compare. Write: cairn diff <thread> <checkpoint-a> <checkpoint-b>, cairn diff <thread> --step <a> [--step <b>], or cairn diff <thread-a>[@<id>] <thread-b>[@<id>] (see cairn diff --help)`,
      ],
      [
        [`story@${f.first}`, f.first, f.second],
        `cairn: "story@${f.first}" is not a thread: with three arguments the first is a thread and the other two are its checkpoints (cairn diff story <checkpoint-a> <checkpoint-b>). To compare checkpoints of two threads pass two arguments: cairn diff <thread-a>@<id> <thread-b>@<id>`,
      ],
    ];
    const results = await Promise.all(cases.map(([args]) => diff(...args)));
    results.forEach((r, i) => {
      expect({ args: cases[i]![0], code: r.code, stdout: r.stdout, stderr: r.stderr.trimEnd() }).toEqual({ args: cases[i]![0], code: 2, stdout: "", stderr: cases[i]![1] });
    });
  });

  const script = hasScript();
  // Piped output has no colour: every other test compares it exactly.
  it.skipIf(!script.ok)(`colour on a terminal, none with NO_COLOR${script.ok ? "" : ` (skipped: ${script.reason})`}`, async () => {
    const args = ["diff", "story", f.first, f.second, "--store", f.store];
    // script(1) gives the command a terminal; its output is the terminal's.
    const onTerminal = (env: Record<string, string>) =>
      execFileSync("script", ["-qec", [process.execPath, BIN, ...args].map((a) => `'${a}'`).join(" "), "/dev/null"], { cwd: f.cwd, env: childEnv({ TERM: "xterm", ...env }), encoding: "utf8" });
    const coloured = onTerminal({});
    expect(coloured).toContain("\x1b[33m~\x1b[0m scenes[1].prompt: the \x1b[31mstorm\x1b[0m\x1b[32mgale\x1b[0m over the rocks");
    expect(coloured).toContain("\x1b[31m-A storm comes in from the west.\x1b[0m");
    const plain = onTerminal({ NO_COLOR: "1" });
    expect(plain).not.toContain("\x1b[");
    expect(plain).toContain("~ scenes[1].prompt: the [-storm-]{+gale+} over the rocks");
  });
});

function hasScript(): { ok: boolean; reason?: string } {
  try {
    execFileSync("script", ["--version"], { stdio: "ignore" });
    return { ok: true };
  } catch {
    return { ok: false, reason: "no script(1) to give the command a terminal" };
  }
}
