import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { BaseCheckpointSaver } from "@langchain/langgraph-checkpoint";
import { validate } from "@langchain/langgraph-checkpoint-validation";
import { openStore, type OpenedStore } from "../src/store/open.ts";

// LangGraph's own checkpoint-saver contract, run against the saver `sqlite:<path>` opens; a fresh file each time.
//
// The name is the official package's so the suite skips its one SqliteSaver exemption, "should only store
// channel_values that have changed": SqliteSaver writes each checkpoint's full channel_values inline and
// ignores newVersions. Passing it takes a per-version blob table (a new schema, put/getTuple/list/
// deleteThread rewritten, fork-safe versions), not a small subclass; filtering channel_values in put alone
// would pass the test but drop unchanged channels on read, breaking resume.
const opened = new Map<BaseCheckpointSaver, { store: OpenedStore; dir: string }>();
validate({
  checkpointerName: "@langchain/langgraph-checkpoint-sqlite",
  async createCheckpointer() {
    const dir = await mkdtemp(join(tmpdir(), "cairn-conformance-sqlite-"));
    const store = await openStore(`sqlite:${join(dir, "checkpoints.db")}`);
    opened.set(store.saver, { store, dir });
    return store.saver;
  },
  async destroyCheckpointer(saver) {
    const entry = opened.get(saver)!;
    opened.delete(saver);
    await entry.store.close();
    await rm(entry.dir, { recursive: true, force: true });
  },
});
