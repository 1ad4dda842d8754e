/**
 * A sprite-sheet pipeline (after SpriteForge): a character config and a base image in; each animation row
 * is drawn as a strip of frames by an image model, checked by a pixel-level verification gate, and drawn
 * again while it fails (up to `maxAttempts` per row); the passed strips are assembled into one sheet PNG.
 *
 * Every strip that passes is a PNG artifact in cairn's store, and each row is checkpointed on its own, so
 * a crashed run resumes without paying again for any row it had saved. Runs offline: the "image model" is
 * the deterministic stand-in of ./lib/sprites.ts, which gets about 30% of rows wrong on the first try.
 *
 *   cairn run graphs/spritesheet.ts --thread knight
 *   cairn run graphs/spritesheet.ts --input '{"config":"my-hero.json","baseImage":"my-hero.png"}'
 *
 * When SPRITESHEET_EXEC_LOG names a file, every image generation appends `gen <row> <attempt>` to it
 * before it starts and `gen <row> <attempt> end` once its strip is verified (the crash test counts them).
 */
import { appendFileSync, readFileSync } from "node:fs";
import { mkdir, readFile } from "node:fs/promises";
import { basename, extname, join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import writeFileAtomic from "write-file-atomic";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { artifactRef, workflow, type ArtifactRef, type StepContext } from "cairn";
import { hashText } from "./lib/random.ts";
import { assembleSheet, CharacterConfig, decodePng, drawStrip, loadCharacterConfig, verifyStrip, type RgbaImage } from "./lib/sprites.ts";

/** What one generated strip costs: a stand-in for an image API's per-image price (DALL·E 3 lists $0.04). */
export const IMAGE_PRICE_USD = 0.04;

/** How many rows are drawn at once (image APIs rate-limit). */
const CONCURRENCY = 2;

const Row = z.object({
  index: z.number().int(),
  animation: z.string(),
  frames: z.number().int(),
  /** Strips generated for this row so far. */
  attempts: z.number().int(),
  /** Attempts this row may use: `maxAttempts`, raised by a resume after the gate gave up on it. */
  allowed: z.number().int(),
  status: z.enum(["pending", "passed", "failed"]),
  /** Why the latest strip failed verification. */
  reason: z.string().optional(),
  /** The verified strip (status "passed"). */
  strip: artifactRef.optional(),
});
type Row = z.infer<typeof Row>;

/** One generation: a row's strip at one attempt, and the gate's verdict on it. */
const Generation = z.object({
  index: z.number().int(),
  attempt: z.number().int(),
  status: z.enum(["passed", "failed"]),
  reason: z.string().optional(),
  strip: artifactRef.optional(),
});
type Generation = z.infer<typeof Generation>;

const State = z.object({
  /** The character config: a .json, .yaml or .yml file (checked before the run starts). */
  config: z.string().superRefine((path, ctx) => {
    const problem = configProblem(path);
    if (problem) ctx.addIssue({ code: "custom", message: problem });
  }),
  /** The base image: a square PNG, one frame in size. */
  baseImage: z.string().superRefine((path, ctx) => {
    const problem = pngProblem(path);
    if (problem) ctx.addIssue({ code: "custom", message: problem });
  }),
  /** The sheet is written to `<outDir>/<thread>/<name>-sheet.png`, with `<name>-sheet.json` beside it. */
  outDir: z.string().min(1).default("out/spritesheet"),
  /** Strips a row may generate before the gate gives up on it. */
  maxAttempts: z.number().int().min(1).max(10).default(3),
  /** Delete the thread's checkpoints once the sheet is written (the sheet and the artifacts stay). */
  cleanup: z.boolean().default(false),
  /** Milliseconds each stand-in image generation takes. */
  delayMs: z.number().int().min(0).default(150),
  /** The image model's seed; default: the config's `seed`, else a hash of the character's name. */
  seed: z.number().int().optional(),

  character: z.object({ name: z.string(), frameSize: z.number().int(), seed: z.number().int() }).optional(),
  base: artifactRef.optional(),
  rows: z.array(Row).default([]),
  /** Generation passes started; each generates the rows in `todo`. */
  pass: z.number().int().default(0),
  /** Rows (indexes) the next pass generates. */
  todo: z.array(z.number().int()).default([]),
  /** The latest pass's generations, in `todo` order. */
  generated: z.array(Generation).default([]),
  sheet: artifactRef.optional(),
  sheetPath: z.string().optional(),
});
type State = z.infer<typeof State>;

/** What a fan-out item of `generate_rows` carries: everything it needs, since it cannot see the state. */
interface RowJob {
  row: Pick<Row, "index" | "animation" | "frames" | "allowed">;
  attempt: number;
  base: ArtifactRef;
  frameSize: number;
  seed: number;
  delayMs: number;
  pass: number;
  /** Animations complete before this pass, and those this pass generates: for the resume line. */
  complete: string[];
  inPass: string[];
  rowCount: number;
}

export default workflow("spritesheet", {
  state: State,
  defaultInput: { config: "graphs/assets/knight.yaml", baseImage: "graphs/assets/knight.png" },
  version: "1",
  cleanupOnSuccess: (s) => s.cleanup,
})
  .step("load_config", async (s, ctx) => {
    resumesHere(ctx); // records that this run starts from the beginning
    const config = await loadCharacterConfig(s.config);
    const bytes = await readFile(s.baseImage);
    const image = decodePng(bytes);
    if (image.width !== config.frameSize || image.height !== config.frameSize) {
      throw new Error(
        `Base image ${s.baseImage} is ${image.width}×${image.height} px, but ${s.config} sets frameSize ${config.frameSize}: the base image must be one frame, ${config.frameSize}×${config.frameSize} px.`,
      );
    }
    const seed = s.seed ?? config.seed ?? hashText(config.name);
    const base = await ctx.artifacts.put(bytes, { mediaType: "image/png", name: basename(s.baseImage) });
    const rows: Row[] = config.rows.map((r, index) => ({ index, ...r, attempts: 0, allowed: s.maxAttempts, status: "pending" }));
    ctx.log(
      `${config.name}: ${rows.length} rows (${rows.map((r) => `${r.animation} ×${r.frames}`).join(", ")}), ${config.frameSize} px frames, seed ${seed}, up to ${s.maxAttempts} ${s.maxAttempts === 1 ? "attempt" : "attempts"} per row`,
    );
    return { character: { name: config.name, frameSize: config.frameSize, seed }, base, rows, todo: rows.map((r) => r.index) };
  })
  .map("generate_rows", {
    over: (s): RowJob[] =>
      s.todo.map((i) => {
        const row = s.rows[i]!;
        return {
          row: { index: row.index, animation: row.animation, frames: row.frames, allowed: row.allowed },
          attempt: row.attempts + 1,
          base: s.base!,
          frameSize: s.character!.frameSize,
          seed: s.character!.seed,
          delayMs: s.delayMs,
          pass: s.pass + 1,
          complete: s.rows.filter((r) => r.status === "passed").map((r) => r.animation),
          inPass: s.todo.map((j) => s.rows[j]!.animation),
          rowCount: s.rows.length,
        };
      }),
    run: async (job, ctx): Promise<Generation> => {
      const { row, attempt } = job;
      if (resumesHere(ctx)) {
        // An item cannot see which of its siblings were saved before the interruption; the gate names them.
        ctx.log(
          `resumed during pass ${job.pass} (${job.inPass.join(", ")}): rows found complete before this pass: ${listRows(job.complete, job.rowCount)}; its strips saved before the interruption are kept`,
        );
      }
      execLog(`gen ${row.index} ${attempt}`);
      const base = decodePng(await ctx.artifacts.get(job.base));
      const bytes = await generateStrip(base, job, ctx);
      const check = verifyStrip(bytes, row, job.frameSize);
      execLog(`gen ${row.index} ${attempt} end`);
      runMemo(ctx).generated.add(`${row.index}#${attempt}`);
      if (!check.ok) {
        ctx.log(`row ${row.index} ${row.animation}: attempt ${attempt} of ${row.allowed} rejected: ${check.reason}`);
        return { index: row.index, attempt, status: "failed", reason: check.reason };
      }
      const strip = await ctx.artifacts.put(bytes, { mediaType: "image/png", name: `row-${row.index}-${row.animation}.png` });
      ctx.log(`row ${row.index} ${row.animation}: attempt ${attempt} of ${row.allowed} passed`);
      return { index: row.index, attempt, status: "passed", strip };
    },
    into: "generated",
    concurrency: CONCURRENCY,
  })
  .step(
    "gate",
    (s, ctx) => {
      const first = resumesHere(ctx);
      const rows = s.rows.map((r) => ({ ...r }));
      for (const g of s.generated) {
        const row = rows[g.index]!;
        Object.assign(row, { attempts: g.attempt, status: g.status, reason: g.reason, strip: g.strip });
      }
      // This try follows a failed one (the gate gave up, and the user resumed): give the rows it gave up
      // on another `maxAttempts`. Only a resume gets here, so a resume is how a user asks for more tries.
      const regranted = ctx.attempt > 1 ? rows.filter((r) => r.status === "failed" && r.attempts >= r.allowed) : [];
      for (const r of regranted) r.allowed = r.attempts + s.maxAttempts;

      const passed = rows.filter((r) => r.status === "passed");
      // As the run's first unit the gate found every row it merges; later in a resumed run, only some.
      const found = ctx.resumed && !first ? foundSaved(ctx, s.generated, rows) : [];
      const foundNote = found.length ? `; saved before the interruption and kept: ${found.join(", ")}` : "";
      const grantNote = regranted.length ? `; ${regranted.map((r) => r.animation).join(", ")} ${regranted.length === 1 ? "gets" : "get"} ${s.maxAttempts} more ${s.maxAttempts === 1 ? "attempt" : "attempts"}` : "";
      const exhausted = rows.filter((r) => r.status === "failed" && r.attempts >= r.allowed);
      if (exhausted.length) {
        const kept = passed.length ? ` The rows that passed are saved: ${passed.map((r) => r.animation).join(", ")}.` : "";
        const more = `${s.maxAttempts} more ${s.maxAttempts === 1 ? "attempt" : "attempts"}`;
        throw new Error(
          `${exhausted.length === 1 ? "Row" : "Rows"} ${exhausted.map((r) => `${r.animation} (row ${r.index}, ${r.attempts} ${r.attempts === 1 ? "attempt" : "attempts"}: ${r.reason})`).join(", ")} failed verification on every allowed attempt (maxAttempts ${s.maxAttempts}).${kept} ` +
            `\`cairn resume\` gives each failed row ${more}; a different config or maxAttempts needs a new run.`,
        );
      }
      const todo = rows.filter((r) => r.status !== "passed");
      const retry = todo.length ? `; regenerating: ${todo.map((r) => `${r.animation} (attempt ${r.attempts + 1} of ${r.allowed})`).join(", ")}` : "";
      ctx.log(`${first ? "resumed: " : ""}rows ${first ? "found " : ""}complete: ${listRows(passed.map((r) => r.animation), rows.length)}${foundNote}${grantNote}${retry}`);
      return { rows, todo: todo.map((r) => r.index), pass: s.pass + 1, generated: [] };
    },
    { retry: false },
  )
  .step("assemble_sheet", async (s, ctx) => {
    if (resumesHere(ctx)) ctx.log(`resumed: rows found complete: ${listRows(s.rows.map((r) => r.animation), s.rows.length)}`);
    const { name, frameSize } = s.character!;
    const strips = await Promise.all(s.rows.map((r) => ctx.artifacts.get(r.strip!)));
    const bytes = assembleSheet(strips, frameSize);
    const sheet = await ctx.artifacts.put(bytes, { mediaType: "image/png", name: `${name}-sheet.png` });
    const { width, height } = decodePng(bytes);
    const dir = join(s.outDir, pathSegment(ctx.thread));
    const sheetPath = join(dir, `${name}-sheet.png`);
    const metadata = {
      name,
      frameSize,
      width,
      height,
      sheet: { file: basename(sheetPath), sha256: sheet.sha256 },
      rows: s.rows.map((r) => ({ row: r.index, animation: r.animation, frames: r.frames, y: r.index * frameSize, attempts: r.attempts, sha256: r.strip!.sha256 })),
    };
    await mkdir(dir, { recursive: true });
    // Whole files or none: a crash mid-write must not leave a truncated sheet behind for a game to load.
    await writeFileAtomic(sheetPath, Buffer.from(bytes));
    await writeFileAtomic(join(dir, `${name}-sheet.json`), `${JSON.stringify(metadata, null, 2)}\n`);
    const images = s.rows.reduce((n, r) => n + r.attempts, 0);
    ctx.log(`wrote ${sheetPath} (${width}×${height} px, ${s.rows.length} rows; ${images} images generated) and ${name}-sheet.json`);
    return { sheet, sheetPath };
  })
  .route("gate", (s) => (s.todo.length ? "generate_rows" : "assemble_sheet"), { targets: ["generate_rows", "assemble_sheet"] });

/**
 * The stand-in image model: takes `delayMs`, as a real call takes seconds, and is charged per image.
 * The charge is reported before the strip is checked: a rejected image is paid for too.
 */
async function generateStrip(base: RgbaImage, job: RowJob, ctx: StepContext): Promise<Uint8Array> {
  await sleep(job.delayMs, undefined, { signal: ctx.signal });
  const bytes = drawStrip(base, job.row, job.row.index, job.attempt, job.seed);
  ctx.usage({ usd: IMAGE_PRICE_USD, calls: 1 });
  return bytes;
}

function listRows(animations: string[], total: number): string {
  return `${animations.length ? animations.join(", ") : "none"} (${animations.length} of ${total})`;
}

/**
 * What this process knows about one run: whether its first step or item has run, and which generations
 * it made. `ctx.signal` belongs to one run (cairn makes one per run), so it keys the memo; the memo goes
 * with the run. cairn tells a step that the run is a resume (`ctx.resumed`) but not which fan-out items
 * were saved before it, so this is how the workflow names the rows it found complete.
 */
const runs = new WeakMap<AbortSignal, { firstStep?: string; generated: Set<string> }>();

function runMemo(ctx: StepContext): { firstStep?: string; generated: Set<string> } {
  let memo = runs.get(ctx.signal);
  if (!memo) runs.set(ctx.signal, (memo = { generated: new Set() }));
  return memo;
}

/** Record the run's first unit of work; true when this is it and the run is a resume: it says what it found. */
function resumesHere(ctx: StepContext): boolean {
  const memo = runMemo(ctx);
  if (memo.firstStep !== undefined) return false;
  memo.firstStep = ctx.step;
  return ctx.resumed;
}

/** Passed rows of the latest pass that this run did not generate: a run before it did, and they were saved. */
function foundSaved(ctx: StepContext, generated: Generation[], rows: Row[]): string[] {
  const here = runMemo(ctx).generated;
  return generated.filter((g) => g.status === "passed" && !here.has(`${g.index}#${g.attempt}`)).map((g) => rows[g.index]!.animation);
}

function execLog(line: string): void {
  const file = process.env.SPRITESHEET_EXEC_LOG;
  // Synchronous, so the line is on disk before the generation starts, even if the process is killed.
  if (file) appendFileSync(file, `${line}\n`);
}

/** A thread id as one safe path segment: characters outside [A-Za-z0-9_-] as %HH, as the file store does. */
function pathSegment(thread: string): string {
  return Array.from(Buffer.from(thread, "utf8"), (b) => {
    const c = String.fromCharCode(b);
    return /[A-Za-z0-9_-]/.test(c) ? c : `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
  }).join("");
}

/**
 * Why a config file would fail `load_config`, checked when the input is: a bad config is bad input (exit
 * 2, no thread created), not a failed step. Mirrors `loadCharacterConfig`, which `load_config` still runs.
 */
function configProblem(path: string): string | undefined {
  const ext = extname(path).toLowerCase();
  if (ext !== ".json" && ext !== ".yaml" && ext !== ".yml") return `Character config ${path} has an unsupported extension "${ext}"; use .json, .yaml or .yml.`;
  let raw: unknown;
  try {
    const text = readFileSync(path, "utf8");
    raw = ext === ".json" ? JSON.parse(text) : parseYaml(text);
  } catch (error) {
    return `Cannot load character config ${path}: ${(error as Error).message}`;
  }
  const result = CharacterConfig.safeParse(raw);
  if (result.success) return undefined;
  const issues = result.error.issues.map((i) => `${i.path.map((k) => (typeof k === "number" ? `[${k}]` : `.${String(k)}`)).join("").replace(/^\./, "") || "(top level)"}: ${i.message}`);
  return `Invalid character config ${path}: ${issues.join("; ")}`;
}

function pngProblem(path: string): string | undefined {
  try {
    decodePng(readFileSync(path));
    return undefined;
  } catch (error) {
    return `Cannot use base image ${path}: ${(error as Error).message}`;
  }
}
