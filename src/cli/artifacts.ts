import { mkdir, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { latestTuple, openStore } from "../index.ts";
import { checkCheckpointId, checkpointNotFound } from "../inspect/history.ts";
import { extensionFor, findArtifactRefs, type ArtifactRef } from "../store/artifacts.ts";
import { isInternalChannel } from "../store/steps.ts";
import { MAP_PREFIX } from "../channels.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import { formatBytes, table, type Io } from "./render.ts";

export const usage = `cairn artifacts <thread> [--checkpoint <id>] [--out <dir>] [--store <uri>] [--json]

List the artifacts (images, audio, video) a thread's state refers to: field, name, type, size, hash, where the bytes are.
Finished items of an unfinished fan-out are included.
  --out   also write each artifact to <dir>, named by its name (or hash), for viewing or shipping`;

interface Listed {
  field: string;
  ref: ArtifactRef;
  location: string;
}

export async function artifactsCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("artifacts", argv, { ...COMMON_OPTIONS, checkpoint: { type: "string" }, out: { type: "string" } });
  if (values.help) return io.out(usage), 0;
  const thread = onePositional("artifacts", positionals, "a thread id");
  checkCheckpointId(thread, values.checkpoint);
  const store = await openStore(values.store);
  try {
    let tuple = await latestTuple(store.saver, thread, store.uri);
    if (values.checkpoint !== undefined) {
      const at = await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: values.checkpoint } });
      if (!at) throw checkpointNotFound(thread, values.checkpoint, store.uri);
      tuple = at;
    }
    const found: { field: string; ref: ArtifactRef }[] = [];
    for (const [channel, value] of Object.entries(tuple.checkpoint.channel_values as Record<string, unknown>)) {
      if (!isInternalChannel(channel)) found.push(...findArtifactRefs(value, channel).map(({ path, ref }) => ({ field: path, ref })));
      else if (channel.startsWith(MAP_PREFIX)) found.push(...savedItems(channel, value));
    }
    for (const [, channel, value] of tuple.pendingWrites ?? []) if (channel.startsWith(MAP_PREFIX)) found.push(...savedItems(channel, value));
    const listed: Listed[] = found.map((f) => ({ ...f, location: store.artifacts.locate(f.ref) }));
    const present = new Map<string, boolean>();
    for (const l of listed) if (!present.has(l.ref.sha256)) present.set(l.ref.sha256, await store.artifacts.has(l.ref.sha256));
    if (values.json) {
      io.out(JSON.stringify(listed.map((l) => ({ ...l, present: present.get(l.ref.sha256) })), null, 2));
    } else if (listed.length === 0) {
      io.out(`Thread ${thread} refers to no artifacts${values.checkpoint ? ` at checkpoint ${values.checkpoint}` : ""}.`);
    } else {
      const rows = [["FIELD", "NAME", "TYPE", "SIZE", "SHA256", "WHERE"]];
      for (const l of listed) {
        rows.push([l.field, l.ref.name ?? "", l.ref.mediaType, formatBytes(l.ref.size), l.ref.sha256.slice(0, 12), present.get(l.ref.sha256) ? l.location : `MISSING (${l.location})`]);
      }
      for (const line of table(rows)) io.out(line);
      const unique = new Set(listed.map((l) => l.ref.sha256));
      io.out(`${listed.length} reference${listed.length === 1 ? "" : "s"}, ${unique.size} distinct artifact${unique.size === 1 ? "" : "s"}.`);
    }
    const missing = [...present].filter(([, ok]) => !ok).length;
    if (values.out !== undefined) {
      const dir = resolve(values.out);
      await mkdir(dir, { recursive: true });
      const written = new Map<string, string>();
      const used = new Set<string>();
      for (const l of listed) {
        if (written.has(l.ref.sha256) || !present.get(l.ref.sha256)) continue;
        const name = uniqueName(l.ref, used);
        await writeFile(join(dir, name), await store.artifacts.get(l.ref));
        written.set(l.ref.sha256, name);
      }
      io.err(`wrote ${written.size} file${written.size === 1 ? "" : "s"} to ${dir}`);
    }
    if (missing > 0) {
      io.err(`cairn: ${missing} artifact${missing === 1 ? " is" : "s are"} missing from the store. Rerun the steps that made them: cairn resume <graph.ts> --thread ${thread} --from-step <step>`);
      return 1;
    }
    return 0;
  } finally {
    await store.close();
  }
}

/** Artifacts inside a fan-out's saved item results (`{ i, r }` parts). */
function savedItems(channel: string, value: unknown): { field: string; ref: ArtifactRef }[] {
  if (!Array.isArray(value)) return [];
  const step = channel.slice(MAP_PREFIX.length);
  return (value as { i?: number; r?: unknown }[]).flatMap((part) =>
    findArtifactRefs(part.r, "").map(({ path, ref }) => ({ field: `${step}[item ${part.i}]${path ? (path.startsWith("[") ? path : `.${path}`) : ""}`, ref })),
  );
}

/** A file name for an artifact: its own name when it has one, else its hash; never the same twice. */
function uniqueName(ref: ArtifactRef, used: Set<string>): string {
  const base = (ref.name ?? `${ref.sha256.slice(0, 16)}.${extensionFor(ref.mediaType)}`).replace(/[/\\\0]/g, "_");
  let name = base;
  for (let n = 2; used.has(name); n += 1) name = base.replace(/(\.[^.]*)?$/, `-${n}$1`);
  used.add(name);
  return name;
}
