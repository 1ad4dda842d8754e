import { diffWords, structuredPatch } from "diff";
import { CairnError, diffCheckpoints, isArtifactRef, isCairnError, openStore, parseStateRef, readHistory, type OpenedStore, type PathSegment, type StateChange, type StateDiff, type StateRef } from "../index.ts";
import { COMMON_OPTIONS, parse } from "./args.ts";
import { describeArtifact, plural, shellArg, type Io } from "./render.ts";

export const usage = `cairn diff <thread> <checkpoint-a> <checkpoint-b> | <thread> --step <a> [--step <b>] | <thread-a>[@<id>] <thread-b>[@<id>] [--step …] [--store <uri>] [--json]

Compare two states: which fields the second added, removed and changed, and how. Strings show as a line
diff (a word diff when on one line), objects and arrays key by key and item by item, artifacts by name and
hash; cairn's own channels are left out. Exits 0 whether or not the states differ.
  cairn diff <thread> <checkpoint-a> <checkpoint-b>        two checkpoints of a thread (ids from: cairn history <thread>)
  cairn diff <thread> --step <a>                           what step a changed: the state before its last run vs after it
  cairn diff <thread> --step <a> --step <b>                the state after step a vs after step b (current branch)
  cairn diff <thread-a> <thread-b>                         the latest state of each thread
  cairn diff <thread-a>@<id> <thread-b>@<id>               a checkpoint of each (either side may be a bare thread: its latest state)
  cairn diff <thread-a> <thread-b> --step <s>              after step s in each thread
  cairn diff <thread-a> <thread-b> --step <a> --step <b>   after step a in thread-a vs after step b in thread-b
  --json   {"a":{thread,checkpoint,step,ts},"b":{…},"changes":[{path,segments,kind,before,after}]}: kind is
           "added", "removed" or "changed"; before and after are the full values (absent for added / removed)`;

const FORMS = `Write: cairn diff <thread> <checkpoint-a> <checkpoint-b>, cairn diff <thread> --step <a> [--step <b>], or cairn diff <thread-a>[@<id>] <thread-b>[@<id>] (see cairn diff --help)`;

export async function diffCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("diff", argv, { ...COMMON_OPTIONS, step: { type: "string", multiple: true } });
  if (values.help) return io.out(usage), 0;
  const steps = values.step ?? [];
  const store = await openStore(values.store);
  try {
    const [a, b] = await refsOf(store, positionals, steps);
    const diff = await withHint(store, positionals, () => diffCheckpoints(store.saver, store.uri, a, b));
    if (values.json) {
      const side = (s: StateDiff["a"]) => ({ thread: s.thread, checkpoint: s.checkpoint, step: s.step, ts: s.ts });
      io.out(JSON.stringify({ a: side(diff.a), b: side(diff.b), changes: diff.changes }, null, 2));
      return 0;
    }
    renderDiff(io, diff, [a, b], colorsFor(process.stdout.isTTY === true && !process.env.NO_COLOR && process.env.TERM !== "dumb"));
    return 0;
  } finally {
    await store.close();
  }
}

/** The two states the arguments name, or a usage error that says how to write them. */
async function refsOf(store: OpenedStore, positionals: string[], steps: string[]): Promise<[StateRef, StateRef]> {
  if (steps.length > 2) throw new CairnError("INVALID_ARGUMENT", `cairn diff takes --step at most twice, got ${steps.length}: ${steps.join(", ")}. ${FORMS}`);
  if (positionals.length === 3) {
    const [thread, a, b] = positionals as [string, string, string];
    const at = thread.lastIndexOf("@");
    if (at > 0 && (await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } })) === undefined) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `"${thread}" is not a thread: with three arguments the first is a thread and the other two are its checkpoints (cairn diff ${shellArg(thread.slice(0, at))} <checkpoint-a> <checkpoint-b>). To compare checkpoints of two threads pass two arguments: cairn diff <thread-a>@<id> <thread-b>@<id>`,
        { thread },
      );
    }
    if (steps.length > 0) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `--step ${steps.join(" --step ")} cannot be combined with checkpoints ${a} and ${b}: name the states by checkpoint or by step, not both. ${FORMS}`,
        { thread },
      );
    }
    return [
      { thread, checkpoint: a },
      { thread, checkpoint: b },
    ];
  }
  if (positionals.length === 2) {
    const refs = [await parseStateRef(store.saver, positionals[0]!), await parseStateRef(store.saver, positionals[1]!)] as [StateRef, StateRef];
    if (steps.length === 0) return refs;
    const fixed = refs.filter((r) => r.checkpoint !== undefined);
    if (fixed.length > 0) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `--step ${steps.join(" --step ")} cannot be combined with ${fixed.map((r) => `checkpoint ${r.checkpoint} of thread "${r.thread}"`).join(" and ")}: name the states by checkpoint or by step, not both. ${FORMS}`,
      );
    }
    return [
      { thread: refs[0].thread, step: steps[0] },
      { thread: refs[1].thread, step: steps[1] ?? steps[0] },
    ];
  }
  if (positionals.length === 1) {
    const ref = await parseStateRef(store.saver, positionals[0]!);
    if (ref.checkpoint !== undefined) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `cairn diff needs a second state to compare checkpoint ${ref.checkpoint} with. To compare it with the thread's latest state write: cairn diff ${shellArg(positionals[0]!)} ${shellArg(ref.thread)}`,
        { thread: ref.thread, checkpoint: ref.checkpoint },
      );
    }
    if (steps.length === 0) {
      throw new CairnError("INVALID_ARGUMENT", `cairn diff needs two states of thread "${ref.thread}" to compare. ${FORMS}`, { thread: ref.thread });
    }
    if (steps.length === 1) return [{ thread: ref.thread, beforeStep: steps[0] }, { thread: ref.thread, step: steps[0] }];
    return [
      { thread: ref.thread, step: steps[0] },
      { thread: ref.thread, step: steps[1] },
    ];
  }
  if (positionals.length === 0) throw new CairnError("INVALID_ARGUMENT", `cairn diff needs a thread. ${FORMS}`);
  throw new CairnError("INVALID_ARGUMENT", `cairn diff takes at most 3 arguments, got ${positionals.length}: ${positionals.join(" ")}. ${FORMS}`);
}

/**
 * `cairn diff <thread> <checkpoint>` reads as two threads; when the second is a checkpoint of the first,
 * say so and how to write what was probably meant, instead of "no thread".
 */
async function withHint<T>(store: OpenedStore, positionals: string[], fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    const [first, second] = positionals;
    if (positionals.length !== 2 || !isCairnError(error, "THREAD_NOT_FOUND") || error.details.thread !== second) throw error;
    const thread = (await parseStateRef(store.saver, first!)).thread;
    const ids = await readHistory(store.saver, thread).then((h) => h.map((e) => e.id), () => [] as string[]);
    if (!ids.includes(second!)) throw error;
    throw new CairnError(
      "INVALID_ARGUMENT",
      `"${second}" is a checkpoint of thread "${thread}", not a thread: two arguments name two states, each <thread> or <thread>@<checkpoint-id>. ` +
        `To compare it with the latest state write: cairn diff ${shellArg(`${thread}@${second}`)} ${shellArg(thread)}; with another checkpoint: cairn diff ${shellArg(thread)} ${second} <checkpoint-id>.`,
      { thread, checkpoint: second },
    );
  }
}

// -------------------------------------------------------------------------------------------------
// Rendering

interface Colors {
  red(s: string): string;
  green(s: string): string;
  yellow(s: string): string;
  cyan(s: string): string;
  dim(s: string): string;
}

function colorsFor(on: boolean): Colors {
  const wrap = (code: number) => (on ? (s: string) => (s === "" ? s : `\x1b[${code}m${s}\x1b[0m`) : (s: string) => s);
  return { red: wrap(31), green: wrap(32), yellow: wrap(33), cyan: wrap(36), dim: wrap(2) };
}

/** Change entries shown per top-level field before the rest are counted instead. */
const MAX_ENTRIES_PER_FIELD = 20;
/** Lines of a string's line diff shown before the rest are counted. */
const MAX_DIFF_LINES = 40;
/** Width of a value shown on one line. */
const VALUE_WIDTH = 120;
/** Strings at most this long, on one line, show whole (`"a" → "b"`) instead of as a word diff. */
const SHORT_STRING = 40;

/** Writes the lines, and remembers whether any value had to be shortened. */
class Renderer {
  shortened = false;
  constructor(private readonly io: Io) {}

  line(text: string): void {
    this.io.out(text);
  }

  /** A one-line view of a value; longer ones are cut and remembered, for the closing note. */
  value(v: unknown, width = VALUE_WIDTH): string {
    const { text, cut } = compact(v, width);
    if (cut) this.shortened = true;
    return text;
  }

  cut(text: string, width: number): string {
    if (text.length <= width) return text;
    this.shortened = true;
    return `${text.slice(0, width - 1)}…`;
  }
}

function renderDiff(io: Io, diff: StateDiff, refs: [StateRef, StateRef], c: Colors): void {
  const r = new Renderer(io);
  r.line(`a: ${describeSide(diff.a, refs[0])}`);
  r.line(`b: ${describeSide(diff.b, refs[1])}`);
  if (diff.changes.length === 0) {
    r.line("No differences: the two states are identical.");
    return;
  }
  const fields = { added: [] as string[], removed: [] as string[], changed: [] as string[] };
  const byField = new Map<string, StateChange[]>();
  for (const ch of diff.changes) {
    const field = String(ch.segments[0]);
    if (!byField.has(field)) {
      byField.set(field, []);
      fields[ch.segments.length === 1 && ch.kind !== "changed" ? ch.kind : "changed"].push(field);
    }
    byField.get(field)!.push(ch);
  }
  r.line(
    (["added", "removed", "changed"] as const)
      .filter((k) => fields[k].length > 0)
      .map((k) => `${k} ${plural(fields[k].length, "field")}: ${fields[k].join(", ")}`)
      .join(" · "),
  );
  r.line("");
  for (const [field, changes] of byField) renderField(r, c, field, changes, diff);
  if (r.shortened) r.line(c.dim(`Long values are shortened (…); add --json to print them in full.`));
}

function describeSide(s: StateDiff["a"], ref: StateRef): string {
  const chosen = ref.beforeStep !== undefined ? "before step " + ref.beforeStep : ref.step !== undefined ? "after step " + ref.step : ref.checkpoint === undefined ? "latest" : undefined;
  const after = ref.step === undefined ? "after " + s.step : undefined;
  return [`thread ${s.thread}`, chosen, `checkpoint ${s.checkpoint}`, after, s.ts].filter((p) => p !== undefined).join(" · ");
}

function renderField(r: Renderer, c: Colors, field: string, changes: StateChange[], diff: StateDiff): void {
  const summarized = new Set<string>();
  let shown = 0;
  for (let n = 0; n < changes.length; n += 1) {
    if (shown >= MAX_ENTRIES_PER_FIELD) {
      r.line(c.dim(`  … ${plural(changes.length - n, "more change")} in ${field}; add --json to see them all`));
      return;
    }
    const ch = changes[n]!;
    // An array whose length changed gets one line saying how, before its first item.
    for (let d = 1; d < ch.segments.length; d += 1) {
      if (typeof ch.segments[d] !== "number") continue;
      const at = ch.segments.slice(0, d);
      const key = JSON.stringify(at);
      if (summarized.has(key)) continue;
      summarized.add(key);
      const line = arraySummary(at, changes, diff);
      if (line) {
        r.line(`${c.yellow("~")} ${line}`);
        shown += 1;
      }
    }
    renderChange(r, c, ch);
    shown += 1;
  }
}

function arraySummary(at: PathSegment[], changes: StateChange[], diff: StateDiff): string | undefined {
  const before = valueAt(diff.a.values, at);
  const after = valueAt(diff.b.values, at);
  if (!Array.isArray(before) || !Array.isArray(after) || before.length === after.length) return undefined;
  const inside = changes.filter((ch) => ch.segments.length > at.length && at.every((s, i) => ch.segments[i] === s));
  const direct = (kind: StateChange["kind"]) => inside.filter((ch) => ch.segments.length === at.length + 1 && ch.kind === kind);
  const added = direct("added").length;
  const removed = direct("removed").length;
  const changed = new Set(inside.filter((ch) => ch.segments.length > at.length + 1 || ch.kind === "changed").map((ch) => ch.segments[at.length])).size;
  let how: string;
  if (added === inside.length && inside.every((ch) => (ch.segments[at.length] as number) >= before.length)) how = `+${added} appended`;
  else if (removed === inside.length && inside.every((ch) => (ch.segments[at.length] as number) >= after.length)) how = `${removed} removed from the end`;
  else how = [added && `+${added} added`, removed && `${removed} removed`, changed && `${changed} changed`].filter(Boolean).join(", ");
  return `${pathText(at)}: ${plural(before.length, "item")} → ${plural(after.length, "item")} (${how})`;
}

function renderChange(r: Renderer, c: Colors, ch: StateChange): void {
  if (ch.kind === "added") {
    r.line(`${c.green("+")} ${ch.path}: ${c.green(describeWhole(r, ch.after))}`);
    return;
  }
  if (ch.kind === "removed") {
    r.line(`${c.red("-")} ${ch.path}: ${c.red(describeWhole(r, ch.before))}`);
    return;
  }
  const mark = c.yellow("~");
  const { before, after } = ch;
  if (typeof before === "string" && typeof after === "string") {
    if (before.includes("\n") || after.includes("\n")) {
      r.line(`${mark} ${ch.path}: ${plural(lineCount(before), "line")} → ${plural(lineCount(after), "line")}`);
      for (const l of lineDiff(r, c, before, after)) r.line(`    ${l}`);
    } else if (before.length <= SHORT_STRING && after.length <= SHORT_STRING) {
      r.line(`${mark} ${ch.path}: ${c.red(JSON.stringify(before))} → ${c.green(JSON.stringify(after))}`);
    } else {
      const words = diffWords(before, after);
      const common = words.reduce((n, p) => (p.added || p.removed ? n : n + p.value.length), 0);
      // A word diff of a rewrite is noise: show the two values instead.
      if (common < Math.max(before.length, after.length) / 3) {
        r.line(`${mark} ${ch.path}: rewritten (${Math.round((100 * common) / Math.max(before.length, after.length))}% in common)`);
        r.line(`    ${c.red(`- ${r.value(before)}`)}`);
        r.line(`    ${c.green(`+ ${r.value(after)}`)}`);
      } else r.line(`${mark} ${ch.path}: ${wordDiff(r, c, words)}`);
    }
    return;
  }
  if (isArtifactRef(before) && isArtifactRef(after)) {
    r.line(`${mark} ${ch.path}: ${c.red(artifactName(before))} → ${c.green(artifactName(after))}`);
    return;
  }
  r.line(`${mark} ${ch.path}: ${c.red(r.value(before, VALUE_WIDTH / 2))} → ${c.green(r.value(after, VALUE_WIDTH / 2))}`);
}

/** A whole added or removed value: an artifact with its type and size, a long string with its line count. */
function describeWhole(r: Renderer, v: unknown): string {
  if (isArtifactRef(v)) return describeArtifact(v);
  const text = r.value(v);
  if (typeof v === "string" && v.includes("\n")) return `${text} (${plural(lineCount(v), "line")})`;
  if (Array.isArray(v) && text.length >= VALUE_WIDTH) return `${plural(v.length, "item")}: ${text}`;
  return text;
}

function artifactName(ref: { name?: string; sha256: string }): string {
  return `${ref.name ?? "(unnamed)"} sha256:${ref.sha256.slice(0, 12)}`;
}

function lineCount(s: string): number {
  return s === "" ? 0 : s.split("\n").length - (s.endsWith("\n") ? 1 : 0);
}

/** A unified diff of two texts, hunks with two lines of context, at most MAX_DIFF_LINES lines. */
function lineDiff(r: Renderer, c: Colors, before: string, after: string): string[] {
  const patch = structuredPatch("a", "b", before, after, undefined, undefined, { context: 2, maxEditLength: 5_000 });
  if (!patch) return [c.dim("(too different to compare line by line)")];
  const out: string[] = [];
  for (const h of patch.hunks) {
    out.push(c.cyan(`@@ -${h.oldStart},${h.oldLines} +${h.newStart},${h.newLines} @@`));
    for (const l of h.lines) {
      if (l.startsWith("\\")) continue;
      const text = r.cut(l, 200);
      out.push(l.startsWith("+") ? c.green(text) : l.startsWith("-") ? c.red(text) : text);
    }
  }
  if (out.length <= MAX_DIFF_LINES) return out;
  r.shortened = true;
  return [...out.slice(0, MAX_DIFF_LINES), c.dim(`… ${plural(out.length - MAX_DIFF_LINES, "more line")} of this diff`)];
}

/**
 * A word diff on one line: removed words as `[-old-]`, added as `{+new+}` (in red and green on a
 * terminal, without the brackets); long unchanged stretches are cut to their ends.
 */
function wordDiff(r: Renderer, c: Colors, parts: ReturnType<typeof diffWords>): string {
  const coloured = c.red("x") !== "x";
  return parts
    .map((p, i) => {
      if (p.added) return coloured ? c.green(r.cut(p.value, 160)) : `{+${r.cut(p.value, 160)}+}`;
      if (p.removed) return coloured ? c.red(r.cut(p.value, 160)) : `[-${r.cut(p.value, 160)}-]`;
      const v = p.value;
      if (v.length <= 60) return v;
      r.shortened = true;
      if (i === 0) return `…${v.slice(-30)}`;
      if (i === parts.length - 1) return `${v.slice(0, 30)}…`;
      return `${v.slice(0, 25)}…${v.slice(-25)}`;
    })
    .join("");
}

function valueAt(root: unknown, at: PathSegment[]): unknown {
  let v = root;
  for (const s of at) v = v === null || typeof v !== "object" ? undefined : (v as Record<string | number, unknown>)[s];
  return v;
}

function pathText(at: PathSegment[]): string {
  return at.map((s, i) => (typeof s === "number" ? `[${s}]` : /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(s) ? (i === 0 ? s : `.${s}`) : `[${JSON.stringify(s)}]`)).join("");
}

/**
 * A value on one line, JSON-like, with artifact references as `artifact name sha256:…`; stops building
 * once past `width`, so a huge value costs no more than a short one.
 */
function compact(value: unknown, width: number): { text: string; cut: boolean } {
  let text = "";
  const write = (s: string) => {
    text += s;
    return text.length <= width;
  };
  const walk = (v: unknown): boolean => {
    if (isArtifactRef(v)) return write(`artifact ${artifactName(v)}`);
    if (typeof v === "string") return write(JSON.stringify(v));
    if (v === null || typeof v !== "object") return write(v === undefined ? "undefined" : typeof v === "bigint" ? `${v}n` : String(v));
    if (ArrayBuffer.isView(v)) return write(`<${v.byteLength} bytes>`);
    if (Array.isArray(v)) {
      if (!write("[")) return false;
      for (let i = 0; i < v.length; i += 1) if ((i > 0 && !write(", ")) || !walk(v[i])) return false;
      return write("]");
    }
    const entries = Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== undefined);
    if (!write("{")) return false;
    for (let i = 0; i < entries.length; i += 1) {
      const [k, x] = entries[i]!;
      if ((i > 0 && !write(", ")) || !write(`${/^[A-Za-z_$][A-Za-z0-9_$]*$/.test(k) ? k : JSON.stringify(k)}: `) || !walk(x)) return false;
    }
    return write("}");
  };
  const whole = walk(value);
  return whole ? { text, cut: false } : { text: `${text.slice(0, width - 1)}…`, cut: true };
}
