import { mkdir, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { extensionFor, listArtifacts, openStore, type ArtifactRef } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import { formatBytes, table, type Io } from "./render.ts";

export const usage = `cairn artifacts <thread> [--checkpoint <id>] [--out <dir>] [--store <uri>] [--json]

List the artifacts (images, audio, video) a thread's state refers to: field, name, type, size, hash, where the bytes are.
Finished items of an unfinished fan-out are included.
  --out   also write each artifact to <dir>, named by its name (or hash), for viewing or shipping`;

export async function artifactsCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("artifacts", argv, { ...COMMON_OPTIONS, checkpoint: { type: "string" }, out: { type: "string" } });
  if (values.help) return io.out(usage), 0;
  const thread = onePositional("artifacts", positionals, "a thread id");
  const store = await openStore(values.store);
  try {
    const listed = await listArtifacts(store, thread, { checkpoint: values.checkpoint });
    if (values.json) {
      io.out(JSON.stringify(listed, null, 2));
    } else if (listed.length === 0) {
      io.out(`Thread ${thread} refers to no artifacts${values.checkpoint ? ` at checkpoint ${values.checkpoint}` : ""}.`);
    } else {
      const rows = [["FIELD", "NAME", "TYPE", "SIZE", "SHA256", "WHERE"]];
      for (const l of listed) {
        rows.push([l.field, l.ref.name ?? "", l.ref.mediaType, formatBytes(l.ref.size), l.ref.sha256.slice(0, 12), l.present ? l.location : `MISSING (${l.location})`]);
      }
      for (const line of table(rows)) io.out(line);
      const unique = new Set(listed.map((l) => l.ref.sha256));
      io.out(`${listed.length} reference${listed.length === 1 ? "" : "s"}, ${unique.size} distinct artifact${unique.size === 1 ? "" : "s"}.`);
    }
    const missing = new Set(listed.filter((l) => !l.present).map((l) => l.ref.sha256)).size;
    if (values.out !== undefined) {
      const dir = resolve(values.out);
      await mkdir(dir, { recursive: true });
      const written = new Map<string, string>();
      const used = new Set<string>();
      for (const l of listed) {
        if (written.has(l.ref.sha256) || !l.present) continue;
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

/** A file name for an artifact: its own name when it has one, else its hash; never the same twice. */
function uniqueName(ref: ArtifactRef, used: Set<string>): string {
  const base = (ref.name ?? `${ref.sha256.slice(0, 16)}.${extensionFor(ref.mediaType)}`).replace(/[/\\\0]/g, "_");
  let name = base;
  for (let n = 2; used.has(name); n += 1) name = base.replace(/(\.[^.]*)?$/, `-${n}$1`);
  used.add(name);
  return name;
}
