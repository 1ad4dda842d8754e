import { nodeFs, type StoreFs } from "./fs.ts";

/** Make a folder's entries durable (a created, renamed or removed file): fsync the folder itself. */
export async function fsyncDir(dir: string, fs: StoreFs = nodeFs): Promise<void> {
  const handle = await fs.open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
