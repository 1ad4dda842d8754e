import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { validate } from "@langchain/langgraph-checkpoint-validation";
import { FileCheckpointSaver } from "cairn";

// LangGraph's own checkpoint-saver contract, run in full against the file store.
const dirs = new Map<FileCheckpointSaver, string>();
validate({
  checkpointerName: "cairn FileCheckpointSaver",
  async createCheckpointer() {
    const dir = await mkdtemp(join(tmpdir(), "cairn-conformance-"));
    const saver = new FileCheckpointSaver({ dir });
    dirs.set(saver, dir);
    return saver;
  },
  async destroyCheckpointer(saver) {
    await saver.close();
    await rm(dirs.get(saver)!, { recursive: true, force: true });
    dirs.delete(saver);
  },
});
