import type { BaseCheckpointSaver } from "@langchain/langgraph-checkpoint";
import { MAP_PREFIX } from "../channels.ts";
import { findArtifactRefs, type ArtifactRef, type ArtifactStore } from "../store/artifacts.ts";
import { isInternalChannel } from "../store/steps.ts";
import { checkCheckpointId, checkpointNotFound, latestTuple } from "./history.ts";

/** One artifact reference in a thread's state, and where its bytes are. */
export interface ListedArtifact {
  /** Where the reference sits: `rows[2].strip`, or `render[item 3]` for a saved item of an unfinished fan-out. */
  field: string;
  ref: ArtifactRef;
  /** A file path, or a table row, for people. */
  location: string;
  /** Whether the store still has the bytes. */
  present: boolean;
}

/**
 * The artifacts a thread's state refers to, at its latest checkpoint or a given one: the state's fields,
 * and the saved items of a fan-out that has not finished (their results are not in the state yet).
 */
export async function listArtifacts(
  store: { saver: BaseCheckpointSaver; artifacts: ArtifactStore; uri: string },
  thread: string,
  at: { checkpoint?: string } = {},
): Promise<ListedArtifact[]> {
  checkCheckpointId(thread, at.checkpoint);
  let tuple = await latestTuple(store.saver, thread, store.uri);
  if (at.checkpoint !== undefined) {
    const found = await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: at.checkpoint } });
    if (!found) throw checkpointNotFound(thread, at.checkpoint, store.uri);
    tuple = found;
  }
  const refs: { field: string; ref: ArtifactRef }[] = [];
  for (const [channel, value] of Object.entries(tuple.checkpoint.channel_values as Record<string, unknown>)) {
    if (!isInternalChannel(channel)) refs.push(...findArtifactRefs(value, channel).map(({ path, ref }) => ({ field: path, ref })));
    else if (channel.startsWith(MAP_PREFIX)) refs.push(...savedItems(channel, value));
  }
  for (const [, channel, value] of tuple.pendingWrites ?? []) if (channel.startsWith(MAP_PREFIX)) refs.push(...savedItems(channel, value));
  const present = new Map<string, boolean>();
  for (const { ref } of refs) if (!present.has(ref.sha256)) present.set(ref.sha256, await store.artifacts.has(ref.sha256));
  return refs.map(({ field, ref }) => ({ field, ref, location: store.artifacts.locate(ref), present: present.get(ref.sha256)! }));
}

/** Artifacts inside a fan-out's saved item results (`{ i, r }` parts). */
function savedItems(channel: string, value: unknown): { field: string; ref: ArtifactRef }[] {
  if (!Array.isArray(value)) return [];
  const step = channel.slice(MAP_PREFIX.length);
  return (value as { i?: number; r?: unknown }[]).flatMap((part) =>
    findArtifactRefs(part.r, "").map(({ path, ref }) => ({ field: `${step}[item ${part.i}]${path ? (path.startsWith("[") ? path : `.${path}`) : ""}`, ref })),
  );
}
