import { isArtifactRef, type ArtifactRef } from "../index.ts";
/** Where a command writes: results to `out`, progress and diagnostics to `err` (stdout stays clean for --json). */
export interface Io {
  out: (text: string) => void;
  err: (text: string) => void;
  /** A block of `err` redrawn in place, when `err` is a terminal. */
  live?: { update(text: string): void; clear(): void };
  /** Ask a person a question and return the answer; absent when no one is at a terminal. */
  ask?: (question: string) => Promise<string>;
}

/** An artifact reference as a person reads it: name, type, size, short hash. */
export function describeArtifact(ref: ArtifactRef): string {
  return `artifact ${ref.name ?? "(unnamed)"} (${ref.mediaType}, ${formatBytes(ref.size)}, sha256:${ref.sha256.slice(0, 12)})`;
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}

export function formatDuration(ms: number | undefined): string {
  if (ms === undefined) return "";
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(2)}s`;
  const m = Math.floor(ms / 60_000);
  return `${m}m${String(Math.round((ms % 60_000) / 1000)).padStart(2, "0")}s`;
}

export function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

/** A short, one-line view of a value for terminal output. */
export function preview(value: unknown, width = 100): string {
  let text: string;
  if (isArtifactRef(value)) text = describeArtifact(value);
  else if (typeof value === "string") text = JSON.stringify(value);
  else if (Array.isArray(value)) text = `[${value.length} item${value.length === 1 ? "" : "s"}]${value.length ? ` ${preview(value[0], 60)}${value.length > 1 ? ", …" : ""}` : ""}`;
  else if (value instanceof Uint8Array) text = `<${value.length} bytes>`;
  else text = JSON.stringify(value) ?? String(value);
  text = text.replace(/\s+/g, " ");
  return text.length > width ? `${text.slice(0, width - 1)}…` : text;
}

/** Print the fields of a state, one line each. */
export function renderState(io: Io, values: Record<string, unknown>): void {
  const keys = Object.keys(values);
  const pad = Math.max(0, ...keys.map((k) => k.length));
  for (const k of keys) io.out(`  ${k.padEnd(pad)}  ${preview(values[k])}`);
}

/** Render a simple table with a header row. */
export function table(rows: string[][]): string[] {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? "").length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join("  ").trimEnd());
}

/** The end of a run or resume: the final state, as JSON on stdout with --json or field by field. */
export function renderFinalState(io: Io, state: Record<string, unknown>, json: boolean): void {
  if (json) {
    io.out(JSON.stringify(state, null, 2));
    return;
  }
  io.out("Final state:");
  renderState(io, state);
}

/** An argument as a POSIX shell would need it written: bare when safe, else single-quoted. */
export function shellArg(value: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(value) ? value : `'${value.replace(/'/g, `'\\''`)}'`;
}

/** `--flag value` for a command line to copy; `--flag=value` when the value starts with a dash. */
export function flag(name: string, value: string): string {
  return value.startsWith("-") ? `--${name}=${shellArg(value)}` : `--${name} ${shellArg(value)}`;
}
