import { appendFileSync, readFileSync, statSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { stringify as toYaml } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FileCheckpointSaver, isCairnError, openStore, run } from "cairn";
import spritesheet from "../graphs/spritesheet.ts";
import { seededRandom } from "../graphs/lib/random.ts";
import { decodePng, drawBase, encodePng, verifyStrip, type CharacterConfig, type RgbaImage } from "../graphs/lib/sprites.ts";
import { cairn, removeWorkdirs, spawnCairn, workdir, type CliResult } from "./helpers/cli.ts";

/*
 * graphs/spritesheet.ts through the `cairn` binary (and the API where only the result matters), on a file
 * store in a temporary directory: the sheet it writes, the strips it keeps as artifacts, the verification
 * loop, a thread SIGKILLed at seeded random moments and resumed, exhausting the attempt limit, and cleanup.
 * SPRITESHEET_CRASH_SEED replays another kill schedule; SPRITESHEET_CRASH_VERBOSE=1 prints the crash thread's
 * processes, execution log and what the store held at each kill.
 */

const GRAPH = "graphs/spritesheet.ts";
/** The knight (seed 1) spoils rows 0 and 4 on the first attempt: seven generations in all. */
const KNIGHT_UNITS = ["0#1", "0#2", "1#1", "2#1", "3#1", "4#1", "4#2"];
/** Generations are slower in the crash test, so that kills land among them. */
const CRASH_DELAY_MS = 250;
const CRASH_SEED = Number(process.env.SPRITESHEET_CRASH_SEED ?? 0x5b17e);
const CRASH_KILLS = 4;

let cwd: string;
let storeDir: string;
let storeUri: string;

beforeAll(async () => {
  cwd = await workdir("cairn-spritesheet-");
  storeDir = join(cwd, "store");
  storeUri = `file:${storeDir}`;
});
afterAll(removeWorkdirs);

const sheetPath = (thread: string) => join(cwd, "out", "spritesheet", thread, "knight-sheet.png");
const artifactFile = (sha256: string) => join(storeDir, "artifacts", sha256.slice(0, 2), `${sha256}.png`);

interface Ref {
  sha256: string;
  name?: string;
  mediaType: string;
}
interface FinalState {
  rows: { index: number; animation: string; frames: number; attempts: number; status: string; strip?: Ref }[];
  sheet: Ref;
  sheetPath: string;
}

/** Generations named in an execution log (`gen <row> <attempt>` lines), as `row#attempt`. */
function starts(log: string): string[] {
  return log.split("\n").flatMap((line) => /^gen (\d+) (\d+)$/.exec(line)?.slice(1, 3).join("#") ?? []);
}

function ends(log: string): string[] {
  return log.split("\n").flatMap((line) => /^gen (\d+) (\d+) end$/.exec(line)?.slice(1, 3).join("#") ?? []);
}

/** The pixels of the `frameSize`-square cell at column `col`, row `row` of an image. */
function cell(image: RgbaImage, frameSize: number, col: number, row = 0): number[] {
  const out: number[] = [];
  for (let y = row * frameSize; y < (row + 1) * frameSize; y += 1) {
    const start = (y * image.width + col * frameSize) * 4;
    out.push(...image.data.subarray(start, start + frameSize * 4));
  }
  return out;
}

/** The uninterrupted run every other test compares with: made once, by whichever test needs it first. */
let referenceRun: Promise<{ result: CliResult; state: FinalState; sheet: Buffer; log: string }> | undefined;
function reference() {
  referenceRun ??= (async () => {
    const execLog = join(cwd, "reference.log");
    const result = await cairn(cwd, ["run", GRAPH, "--thread", "ref", "--store", storeUri, "--json"], { SPRITESHEET_EXEC_LOG: execLog });
    expect(result.code, result.stderr).toBe(0);
    return { result, state: JSON.parse(result.stdout) as FinalState, sheet: await readFile(sheetPath("ref")), log: readFileSync(execLog, "utf8") };
  })();
  return referenceRun;
}

describe("spritesheet example", () => {
  it("draws the knight's sheet with no input: verified strips as PNG artifacts, two rows drawn twice", async () => {
    const { result, state, sheet, log } = await reference();

    expect(state.rows.map((r) => [r.animation, r.attempts, r.status])).toEqual([
      ["idle", 2, "passed"],
      ["walk", 1, "passed"],
      ["attack", 1, "passed"],
      ["hurt", 1, "passed"],
      ["die", 2, "passed"],
    ]);
    expect(starts(log).sort()).toEqual(KNIGHT_UNITS);
    expect(ends(log).sort()).toEqual(KNIGHT_UNITS);
    expect(result.stderr).toContain("· generate_rows[0]: row 0 idle: attempt 1 of 3 rejected: frame 4 of 4 is blank (fully transparent)");
    expect(result.stderr).toContain("· gate: rows complete: walk, attack, hurt (3 of 5); regenerating: idle (attempt 2 of 3), die (attempt 2 of 3)");
    // Seven images at the stand-in's $0.04 each, counted as model calls.
    expect(result.stderr).toMatch(/spent: \$0\.2800 \(.*7 model calls\)/);

    // The sheet: one row per animation, each row the verified strip's pixels, the rest transparent.
    const image = decodePng(sheet);
    expect([image.width, image.height]).toEqual([6 * 32, 5 * 32]);
    for (const row of state.rows) {
      const bytes = await readFile(artifactFile(row.strip!.sha256));
      expect(row.strip).toMatchObject({ mediaType: "image/png", name: `row-${row.index}-${row.animation}.png` });
      expect(verifyStrip(bytes, row, 32)).toEqual({ ok: true });
      const strip = decodePng(bytes);
      for (let f = 0; f < 6; f += 1) {
        const expected = f < row.frames ? cell(strip, 32, f) : Array<number>(32 * 32 * 4).fill(0);
        expect(cell(image, 32, f, row.index), `${row.animation} frame ${f}`).toEqual(expected);
      }
    }
    // The sheet is an artifact too, the same bytes as the file written for people.
    expect(await readFile(artifactFile(state.sheet.sha256))).toEqual(sheet);
    expect(state.sheetPath).toBe(join("out", "spritesheet", "ref", "knight-sheet.png"));
    const metadata = JSON.parse(await readFile(join(cwd, "out", "spritesheet", "ref", "knight-sheet.json"), "utf8")) as { rows: { animation: string; y: number }[] };
    expect(metadata.rows.map((r) => [r.animation, r.y])).toEqual([["idle", 0], ["walk", 32], ["attack", 64], ["hurt", 96], ["die", 128]]);

    // The state holds references, not bytes.
    const inspect = await cairn(cwd, ["inspect", "ref", "--store", storeUri]);
    expect(inspect.code, inspect.stderr).toBe(0);
    expect(inspect.stdout).toMatch(/^ {2}base +artifact knight\.png \(image\/png, 289 B, sha256:[0-9a-f]{12}\)$/m);
    expect(inspect.stdout).toMatch(/^ {2}sheet +artifact knight-sheet\.png \(image\/png, [\d.]+ KB, sha256:[0-9a-f]{12}\)$/m);
    expect(JSON.stringify(state).length).toBeLessThan(8000);
  });

  it("reads a JSON or a YAML config alike, at any frame size", async () => {
    const slime: CharacterConfig = { name: "slime", frameSize: 16, seed: 5, palette: ["#33cc99", "#1b6e52"], rows: [{ animation: "bounce", frames: 3 }, { animation: "squish", frames: 4 }] };
    await writeFile(join(cwd, "slime.json"), JSON.stringify(slime));
    await writeFile(join(cwd, "slime.yml"), toYaml(slime));
    await writeFile(join(cwd, "slime.png"), encodePng(drawBase(slime)));
    const sheets: Buffer[] = [];
    for (const file of ["slime.json", "slime.yml"]) {
      const result = await run(spritesheet, {
        input: { config: join(cwd, file), baseImage: join(cwd, "slime.png"), outDir: join(cwd, "api"), delayMs: 0 },
        thread: `slime-${file.split(".")[1]}`,
        store: storeUri,
      });
      expect(result.status).toBe("completed");
      expect(result.state.rows.map((r) => r.status)).toEqual(["passed", "passed"]);
      sheets.push(await readFile(result.state.sheetPath!));
    }
    const image = decodePng(sheets[0]!);
    expect([image.width, image.height]).toEqual([4 * 16, 2 * 16]);
    expect(sheets[1]).toEqual(sheets[0]);
  });

  it("refuses a bad config as bad input, naming the file and the fields, and creates no thread", async () => {
    await writeFile(join(cwd, "goblin.yaml"), "name: goblin\nframe_size: 32\nrows:\n  - { animation: run, frames: 20 }\n");
    const result = await cairn(cwd, ["run", GRAPH, "--thread", "goblin", "--store", storeUri, "--input", '{"config":"goblin.yaml"}']);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain('Invalid character config goblin.yaml: rows[0].frames: Too big: expected number to be <=16; (top level): Unrecognized key: "frame_size"');

    await writeFile(join(cwd, "goblin.json"), '{ "name": "goblin", "rows": [ ');
    const error = await run(spritesheet, { input: { config: join(cwd, "goblin.json") }, thread: "goblin-json", store: storeUri }).catch((e: unknown) => e);
    expect(isCairnError(error, "INVALID_INPUT")).toBe(true);
    expect((error as Error).message).toContain(`Cannot load character config ${join(cwd, "goblin.json")}: `);

    const store = await openStore(storeUri);
    try {
      expect(await store.listThreadIds()).not.toContain("goblin");
      expect(await store.listThreadIds()).not.toContain("goblin-json");
    } finally {
      await store.close();
    }
  });

  it("survives SIGKILLs at seeded random moments: no saved generation reruns, and the sheet is the same", async () => {
    const { sheet, state: refState } = await reference();
    const thread = "crash";
    const execLog = join(cwd, "crash.log");
    const random = seededRandom(CRASH_SEED);
    const processes: (Child & { command: "run" | "resume" })[] = [];
    const committedAtKill: Set<string>[] = [];
    let final: Child | undefined;
    for (let p = 0; p < CRASH_KILLS + 3 && !final; p += 1) {
      const command = p === 0 ? "run" : "resume";
      // Kill k lands in the k-th quarter of the work still to do, so that kills reach every stage.
      const k = committedAtKill.length;
      const killAfterMs = k < CRASH_KILLS ? ((k + random()) / CRASH_KILLS) * workLeftMs(committedAtKill.at(-1) ?? new Set()) : undefined;
      appendFileSync(execLog, `# ${command}\n`);
      const child = await runChild(command, thread, execLog, killAfterMs);
      processes.push({ ...child, command });
      if (child.killed) {
        committedAtKill.push(await committedGenerations(thread));
        appendFileSync(execLog, `# kill ${committedAtKill.length - 1}\n`);
      } else {
        expect(child.code, child.stderr).toBe(0);
        final = child;
      }
    }
    const log = readFileSync(execLog, "utf8");
    const report = `seed ${CRASH_SEED}; execution log:\n${log}`;
    if (process.env.SPRITESHEET_CRASH_VERBOSE) {
      console.log(`${report}\n${processes.map((c, i) => `--- ${c.command} #${i}${c.killed ? " (killed)" : ""}\n${c.stderr}`).join("\n")}`);
      console.log(committedAtKill.map((c, k) => `kill ${k}: store held ${[...c].sort().join(" ") || "nothing"}`).join("\n"));
    }
    expect(final, report).toBeDefined();
    expect(committedAtKill.length, report).toBeGreaterThanOrEqual(3);

    expect(judge(log, committedAtKill), report).toEqual([]);
    // Every generation the uninterrupted run made, and no other (a passed row is never drawn again).
    expect([...new Set(starts(log))].sort(), report).toEqual(KNIGHT_UNITS);
    expect([...new Set(ends(log))].sort(), report).toEqual(KNIGHT_UNITS);
    expect(await readFile(sheetPath(thread))).toEqual(sheet);
    const state = JSON.parse(final!.stdout) as FinalState;
    expect(state.rows).toEqual(refState.rows);

    // A resume that generated anything first said which rows it found complete.
    for (const child of processes.filter((c) => c.command === "resume" && c.generations > 0)) {
      expect(child.stderr, report).toMatch(/rows found complete/);
    }
  });

  it("fails naming the rows that exhausted maxAttempts; a resume gives them more and keeps the rest", async () => {
    const { sheet } = await reference();
    const execLog = join(cwd, "strict.log");
    const env = { SPRITESHEET_EXEC_LOG: execLog };
    const failed = await cairn(cwd, ["run", GRAPH, "--thread", "strict", "--store", storeUri, "--input", '{"maxAttempts":1,"delayMs":0}'], env);
    expect(failed.code, failed.stderr).toBe(1);
    expect(failed.stderr).toContain(
      '✗ Step "gate" failed: Rows idle (row 0, 1 attempt: frame 4 of 4 is blank (fully transparent)), die (row 4, 1 attempt: strip is 192×24 px, expected 192×32 (6 frames of 32 px)) ' +
        "failed verification on every allowed attempt (maxAttempts 1). The rows that passed are saved: walk, attack, hurt. " +
        "`cairn resume` gives each failed row 1 more attempt; a different config or maxAttempts needs a new run.",
    );
    expect(failed.stderr).toContain(`Continue with: cairn resume ${GRAPH} --thread strict --store ${storeUri}`);
    expect(statSync(sheetPath("strict"), { throwIfNoEntry: false })).toBeUndefined();

    appendFileSync(execLog, "# resume\n");
    const resumed = await cairn(cwd, ["resume", GRAPH, "--thread", "strict", "--store", storeUri], env);
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(resumed.stderr).toContain(
      "· gate: resumed: rows found complete: walk, attack, hurt (3 of 5); idle, die get 1 more attempt; regenerating: idle (attempt 2 of 2), die (attempt 2 of 2)",
    );
    const [first, second] = readFileSync(execLog, "utf8").split("# resume\n");
    expect(starts(first!).sort()).toEqual(["0#1", "1#1", "2#1", "3#1", "4#1"]);
    expect(starts(second!).sort()).toEqual(["0#2", "4#2"]);
    expect(await readFile(sheetPath("strict"))).toEqual(sheet);
  });

  it("with cleanup, keeps only the final checkpoint after the sheet is written, with the sheet and artifacts", async () => {
    const { sheet } = await reference();
    const result = await cairn(cwd, ["run", GRAPH, "--thread", "tidy", "--store", storeUri, "--json", "--input", '{"cleanup":true,"delayMs":0}']);
    expect(result.code, result.stderr).toBe(0);
    expect(result.stderr).toMatch(/the workflow cleans up on success: thread tidy keeps only its final checkpoint; removed \d+ older checkpoints and 0 artifacts only they referred to/);
    const state = JSON.parse(result.stdout) as FinalState;
    expect(await readFile(sheetPath("tidy"))).toEqual(sheet);
    expect(await readFile(artifactFile(state.sheet.sha256))).toEqual(sheet);
    for (const row of state.rows) expect(statSync(artifactFile(row.strip!.sha256)).isFile()).toBe(true);

    const threads = await cairn(cwd, ["threads", "--store", storeUri, "--json"]);
    expect(threads.code, threads.stderr).toBe(0);
    const listed = JSON.parse(threads.stdout) as { thread: string; status: string; checkpoints: number }[];
    expect(listed.find((t) => t.thread === "ref")?.checkpoints).toBeGreaterThan(1);
    expect(listed.find((t) => t.thread === "tidy")).toMatchObject({ status: "completed", checkpoints: 1 });
    // The final state and its artifacts stay readable.
    const artifacts = await cairn(cwd, ["artifacts", "tidy", "--store", storeUri, "--json"]);
    expect(artifacts.code, artifacts.stderr).toBe(0);
    expect((JSON.parse(artifacts.stdout) as { present: boolean }[]).every((a) => a.present)).toBe(true);
  });
});

/**
 * About how long the generations still to do take, from the first one's start to the end of the run: the
 * rest of pass 1 (the first attempts, two at a time), pass 2 (the retries of rows 0 and 4, together), and
 * the gate, assembly and last checkpoints after them.
 */
function workLeftMs(saved: Set<string>): number {
  const firstPass = KNIGHT_UNITS.filter((u) => u.endsWith("#1") && !saved.has(u)).length;
  const secondPass = KNIGHT_UNITS.some((u) => u.endsWith("#2") && !saved.has(u)) ? 1 : 0;
  return (Math.ceil(firstPass / 2) + secondPass) * CRASH_DELAY_MS + 100;
}

interface Child {
  code: number;
  killed: boolean;
  stdout: string;
  stderr: string;
  /** Generations this process started. */
  generations: number;
}

/**
 * `cairn run|resume` on the crash thread, SIGKILLed `killAfterMs` after its first generation starts (when
 * given and it is still running). Startup (tsx, imports) takes seconds and varies, so kills are timed
 * from the execution log, watched every 5 ms, rather than from the spawn.
 */
async function runChild(command: "run" | "resume", thread: string, execLog: string, killAfterMs?: number): Promise<Child> {
  const args = [command, GRAPH, "--thread", thread, "--store", storeUri, "--json"];
  if (command === "run") args.push("--input", JSON.stringify({ delayMs: CRASH_DELAY_MS }));
  const offset = statSync(execLog).size;
  const { child, done } = spawnCairn(cwd, args, { SPRITESHEET_EXEC_LOG: execLog });
  let timer: NodeJS.Timeout | undefined;
  const watch = setInterval(() => {
    if (timer !== undefined || killAfterMs === undefined || statSync(execLog).size <= offset) return;
    timer = setTimeout(() => child.kill("SIGKILL"), killAfterMs);
  }, 5);
  const result = await done;
  clearInterval(watch);
  clearTimeout(timer);
  const generations = starts(readFileSync(execLog, "utf8").slice(offset)).length;
  return { code: result.code, killed: result.signal === "SIGKILL", stdout: result.stdout, stderr: result.stderr, generations };
}

/**
 * The generations the store holds for a thread, as `row#attempt`: in the latest checkpoint, and in task
 * writes saved against it (fan-out items not yet gathered, a gate not yet checkpointed). A generation is
 * recognised by its shape wherever it sits (a result `{index, attempt, status}`, or a row record
 * `{index, attempts, status}`, which holds attempts 1..n), so this does not depend on cairn's channel names.
 */
async function committedGenerations(thread: string): Promise<Set<string>> {
  const saver = new FileCheckpointSaver({ dir: storeDir, stepFiles: false });
  try {
    const found = new Set<string>();
    const tuple = await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
    collectGenerations(tuple?.checkpoint.channel_values, found);
    for (const [, , value] of tuple?.pendingWrites ?? []) collectGenerations(value, found);
    return found;
  } finally {
    await saver.close();
  }
}

function collectGenerations(value: unknown, out: Set<string>): void {
  if (Array.isArray(value)) {
    for (const v of value) collectGenerations(v, out);
    return;
  }
  if (typeof value !== "object" || value === null) return;
  const o = value as Record<string, unknown>;
  if (typeof o.index === "number" && typeof o.status === "string") {
    if (typeof o.attempt === "number") out.add(`${o.index}#${o.attempt}`);
    if (typeof o.attempts === "number") for (let a = 1; a <= o.attempts; a += 1) out.add(`${o.index}#${a}`);
  }
  for (const v of Object.values(o)) collectGenerations(v, out);
}

/**
 * Check the crash thread's execution log: a generation may start again only if a kill came while it was
 * in flight (started, not yet saved); once the store held it at a kill, it must never start again.
 */
function judge(log: string, committedAtKill: Set<string>[]): string[] {
  const violations: string[] = [];
  const kills: number[] = [];
  /** For each generation, the number of kills seen when it last started. */
  const lastStart = new Map<string, number>();
  for (const [n, line] of log.split("\n").entries()) {
    const kill = /^# kill (\d+)$/.exec(line);
    if (kill) kills.push(Number(kill[1]));
    const unit = /^gen (\d+) (\d+)$/.exec(line)?.slice(1, 3).join("#");
    if (!unit) continue;
    const before = lastStart.get(unit);
    if (before !== undefined) {
      const saved = kills.find((k) => committedAtKill[k]!.has(unit));
      if (saved !== undefined) violations.push(`${unit} started again (log line ${n + 1}) although the store held it at kill ${saved}`);
      else if (before === kills.length) violations.push(`${unit} started again (log line ${n + 1}) with no kill since it last started`);
    }
    lastStart.set(unit, kills.length);
  }
  return violations;
}

