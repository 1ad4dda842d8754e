import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { isCairnError } from "../errors.ts";
import { latestTuple } from "./history.ts";
import { FileCheckpointSaver, FILE_STORE_FORMAT_VERSION } from "../store/file.ts";
import type { OpenedStore } from "../store/open.ts";

/** One damaged thing `verifyStore` found: where, what is wrong, and which checkpoints it costs. */
export interface VerifyProblem {
  /** The thread it belongs to (none for the store marker or an artifact). */
  thread?: string;
  /** The file (or table row) at fault. */
  file: string;
  /** Byte offset in a journal. */
  offset?: number;
  what: string;
  /** Checkpoints that cannot be served whole because of it, each with why. */
  checkpoints: { checkpoint: string; why: string }[];
}

/** What `verifyStore` checked and found. */
export interface VerifyReport {
  store: string;
  threads: number;
  checkpoints: number;
  artifacts: number;
  /** Damage not yet set aside: `cairn verify` exits 1 when there is any. */
  problems: VerifyProblem[];
  /** What was not an error: damage set aside by an earlier `resume --fallback`, and what this store's checks cannot cover. */
  notes: string[];
}

/**
 * Scan a store (or one thread of it) for damage. The file store: every journal record's checksum and
 * structure, every checkpoint read back whole (its values decoded, the records it reads from intact),
 * the store marker. SQLite and Postgres: every checkpoint row decoded with the serializer (the database
 * checks its own pages). Every store: every artifact's bytes against their hash (all artifacts of the
 * store, also when one thread is named: artifacts are shared between threads).
 *
 * @example
 * ```ts
 * const store = await openStore("file:.cairn");
 * const report = await verifyStore(store, { thread: "video-001" });
 * for (const p of report.problems) console.log(p.file, p.offset, p.what);
 * ```
 * @throws CairnError THREAD_NOT_FOUND for a named thread the store does not have.
 */
export async function verifyStore(store: OpenedStore, options: { thread?: string } = {}): Promise<VerifyReport> {
  const report: VerifyReport = { store: store.uri, threads: 0, checkpoints: 0, artifacts: 0, problems: [], notes: [] };
  const all = await store.listThreadIds();
  const threads = options.thread !== undefined ? [options.thread] : all;
  const saver = store.saver;
  if (saver instanceof FileCheckpointSaver) {
    if (all.length > 0) await checkMarker(saver.dir, report);
    for (const thread of threads) await verifyFileThread(saver, thread, store.uri, report, options.thread !== undefined);
  } else {
    if (options.thread !== undefined && !all.includes(options.thread)) await latestTuple(saver, options.thread, store.uri);
    for (const thread of threads) await verifyRows(store, thread, report);
    report.notes.push(
      `${store.kind === "sqlite" ? "SQLite" : "Postgres"}: every checkpoint was decoded with the serializer; the database's own pages are not checked here` +
        (store.kind === "sqlite" ? " (run PRAGMA integrity_check for that)" : " (use the server's tools, e.g. amcheck)"),
    );
  }
  for (const artifact of await store.artifacts.list()) {
    report.artifacts += 1;
    for (const copy of await store.artifacts.check(artifact.sha256)) {
      if (copy.problem) report.problems.push({ file: copy.where, what: `artifact sha256:${artifact.sha256.slice(0, 12)}… is damaged: ${copy.problem}`, checkpoints: [] });
    }
  }
  return report;
}

async function verifyFileThread(saver: FileCheckpointSaver, thread: string, uri: string, report: VerifyReport, named: boolean): Promise<void> {
  let found;
  try {
    found = await saver.verifyThread(thread);
  } catch (error) {
    if (!isCairnError(error, "CHECKPOINT_CORRUPT")) throw error;
    // The journal cannot be read at all (emptied, or from a newer cairn).
    report.threads += 1;
    const { file, offset } = error.details;
    // A damaged store marker refuses every thread: it is reported once, as the marker's problem.
    if (report.problems.some((p) => p.file === file)) return;
    report.problems.push({ thread, file: String(file ?? saver.threadDir(thread)), ...(typeof offset === "number" ? { offset } : {}), what: error.message, checkpoints: [] });
    return;
  }
  if (!found) {
    // A folder whose journal holds no complete record: a thread whose creation a crash cut short (its
    // first checkpoint was never acknowledged). Not damage; the next write to the thread starts it again.
    if (!named && (await saver.listThreadIds()).includes(thread)) {
      report.notes.push(`thread "${thread}": its folder holds no complete record yet (its first write was cut short); the next write to it starts it again`);
      return;
    }
    await latestTuple(saver, thread, uri); // THREAD_NOT_FOUND, as every command reports it
    return;
  }
  report.threads += 1;
  report.checkpoints += found.checkpoints;
  const linked = new Set<string>();
  for (const d of found.damage) {
    const held =
      d.held?.kind === "checkpoint" ? `a checkpoint record${d.held.checkpoint ? ` (${d.held.checkpoint})` : ""}` :
      d.held?.kind === "writes" ? `saved task results${d.held.checkpoint ? ` of checkpoint ${d.held.checkpoint}` : ""}` :
      d.held?.kind === "header" ? "the journal's header" :
      d.held?.kind === "end" ? "the clean-close mark" :
      "a record whose kind cannot be told";
    if (d.setAside) {
      report.notes.push(`thread "${thread}": the damaged record at byte ${d.offset} of ${d.file} (${held}) was set aside by resume --fallback; its checkpoints are no longer served`);
      continue;
    }
    const costs = found.affected.filter((a) => a.why.includes(`byte ${d.offset} `) || a.checkpoint === d.held?.checkpoint);
    for (const a of costs) linked.add(a.checkpoint);
    report.problems.push({ thread, file: d.file, offset: d.offset, what: `${d.length} bytes, ${held}: ${d.why}`, checkpoints: costs });
  }
  for (const a of found.affected) {
    if (linked.has(a.checkpoint)) continue;
    report.problems.push({ thread, file: found.file, what: `checkpoint ${a.checkpoint} cannot be read whole: ${a.why}`, checkpoints: [a] });
  }
}

async function verifyRows(store: OpenedStore, thread: string, report: VerifyReport): Promise<void> {
  report.threads += 1;
  let last: string | undefined;
  try {
    for await (const tuple of store.saver.list({ configurable: { thread_id: thread } })) {
      report.checkpoints += 1;
      last = tuple.config.configurable?.checkpoint_id as string | undefined;
    }
  } catch (error) {
    // A row that does not decode stops the listing: the rows after it (older ones) are not reached.
    report.problems.push({
      thread,
      file: store.uri,
      what: `a checkpoint of thread "${thread}"${last ? ` older than ${last}` : ""} does not decode: ${(error as Error).message}. Older checkpoints of the thread were not checked.`,
      checkpoints: [],
    });
  }
}

async function checkMarker(dir: string, report: VerifyReport): Promise<void> {
  const marker = join(dir, "cairn-store.json");
  let text: string;
  try {
    text = await readFile(marker, "utf8");
  } catch {
    report.problems.push({ file: marker, what: "the store marker is missing though the store has threads", checkpoints: [] });
    return;
  }
  // An empty marker is what a crash leaves before its contents reach the disk: rewritten on the next write.
  if (text.trim() === "") return void report.notes.push(`${marker} is empty (a crash while it was first written); the next write rewrites it`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return void report.problems.push({ file: marker, what: "the store marker is not valid JSON", checkpoints: [] });
  }
  const m = parsed as { format?: unknown; version?: unknown };
  if (m?.format !== "cairn-file-store" || typeof m.version !== "number") {
    report.problems.push({ file: marker, what: `the store marker is not one cairn writes (expected {"format":"cairn-file-store","version":${FILE_STORE_FORMAT_VERSION}})`, checkpoints: [] });
  }
}
