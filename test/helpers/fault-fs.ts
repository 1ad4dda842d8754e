import { createHash } from "node:crypto";
import * as fsp from "node:fs/promises";
import { basename, dirname, join, relative, resolve, sep } from "node:path";
import { nodeFs, type StoreFileHandle, type StoreFs } from "../../src/store/fs.ts";

/*
 * A fault-injecting file layer for the file store's crash tests. It passes every operation to the real
 * file system under `root`, and keeps beside it a model of what a power loss could leave:
 *
 * - per file, its live bytes and its durable bytes (as of its last fsync/fdatasync);
 * - per folder, its live entries and its durable entries (as of its last fsync).
 *
 * Every write, truncate, fsync, rename, link, unlink, mkdir and create is a numbered boundary. Armed with
 * `crashAt: k`, the layer performs the boundaries before k, and at k the process "stops": the operation
 * throws (after writing half of it, in "torn" mode) and so does every later operation. The state a crash
 * at k can leave is then materialized into fresh folders: what the process left (a kill), the durable
 * state (power lost: unsynced bytes dropped, renames/creates/unlinks of folders never fsynced undone),
 * the durable bytes under the live names (metadata reached the disk, data did not), the last unsynced
 * write torn in the middle, and files grown to their live size with zeros (size reached the disk, data
 * did not).
 *
 * It can also fail an operation with an errno (ENOSPC, EIO) without stopping, for the disk-full tests.
 */

interface FileNode {
  kind: "file";
  live: Buffer;
  durable: Buffer;
}
interface DirNode {
  kind: "dir";
  live: Map<string, Node>;
  durable: Map<string, Node>;
}
type Node = FileNode | DirNode;

export interface Boundary {
  n: number;
  op: "mkdir" | "create" | "write" | "truncate" | "datasync" | "sync" | "writeFile" | "rename" | "link" | "unlink" | "rmTree";
  path: string;
}

export type CrashVariant = "process" | "power" | "power-names" | "power-torn" | "power-zeros";
export const CRASH_VARIANTS: CrashVariant[] = ["process", "power", "power-names", "power-torn", "power-zeros"];

/** Thrown by every operation at and after the simulated crash. */
export class SimulatedCrash extends Error {
  constructor(readonly at: Boundary | undefined) {
    super(`simulated crash${at ? ` at boundary ${at.n} (${at.op} ${at.path})` : ""}`);
  }
}

export interface Injected {
  /** Fail the first boundary this matches (at or after `from`) with this errno. */
  when: (b: Boundary) => boolean;
  code: "ENOSPC" | "EIO" | "EDQUOT";
  /** Once (default), or every matching boundary from then on. */
  sticky?: boolean;
}

export class FaultFs {
  readonly boundaries: Boundary[] = [];
  /** Count (and possibly crash at) boundaries only once armed. */
  armed = false;
  crashAt?: number;
  crashMode: "clean" | "torn" = "clean";
  crashed?: Boundary | null;
  inject?: Injected;
  /** Errors injected so far. */
  readonly failures: Boundary[] = [];
  private lastWrite?: { node: FileNode; pos: number; len: number };
  private readonly open = new Set<fsp.FileHandle>();

  private constructor(readonly root: string, private readonly tree: DirNode) {}

  /** Model `root` as it is now, every byte and entry of it durable. */
  static async create(root: string): Promise<FaultFs> {
    const abs = resolve(root);
    return new FaultFs(abs, await snapshot(abs));
  }

  // ----------------------------------------------------------------------------------------------
  // The model

  private rel(path: string): string[] | undefined {
    const r = relative(this.root, resolve(path));
    if (r === "") return [];
    if (r.startsWith("..") || r.startsWith(sep)) return undefined;
    return r.split(sep);
  }

  private lookup(path: string): Node | undefined {
    const parts = this.rel(path);
    if (!parts) return undefined;
    let node: Node = this.tree;
    for (const p of parts) {
      if (node.kind !== "dir") return undefined;
      const next: Node | undefined = node.live.get(p);
      if (!next) return undefined;
      node = next;
    }
    return node;
  }

  private parentOf(path: string): { dir: DirNode; name: string } | undefined {
    const parts = this.rel(path);
    if (!parts || parts.length === 0) return undefined;
    const dir = this.lookup(dirname(resolve(path)));
    return dir?.kind === "dir" ? { dir, name: parts[parts.length - 1]! } : undefined;
  }

  /** Record a boundary; throw if the process has crashed or crashes here, or an error is injected. */
  private boundary(op: Boundary["op"], path: string): { b?: Boundary; torn: boolean; fail?: NodeJS.ErrnoException } {
    if (this.crashed !== undefined) throw new SimulatedCrash(this.crashed ?? undefined);
    if (!this.armed || this.rel(path) === undefined) return { torn: false };
    const b: Boundary = { n: this.boundaries.length, op, path };
    this.boundaries.push(b);
    if (this.inject && this.inject.when(b)) {
      if (!this.inject.sticky) this.inject = { ...this.inject, when: () => false };
      this.failures.push(b);
      const fail = Object.assign(new Error(`${this.failures.at(-1)!.op} ${path}: ${this.failures.length} injected ${b.op} failure`), { code: this.inject.code, path }) as NodeJS.ErrnoException;
      fail.message = `${fail.code}: simulated ${fail.code === "ENOSPC" ? "no space left on device" : fail.code === "EDQUOT" ? "disk quota exceeded" : "i/o error"}, ${op} '${path}'`;
      return { b, torn: op === "write" || op === "writeFile", fail };
    }
    if (this.crashAt === b.n) {
      this.crashed = b;
      const torn = this.crashMode === "torn" && (op === "write" || op === "writeFile");
      if (!torn) this.stop();
      return { b, torn };
    }
    return { b, torn: false };
  }

  private stop(): void {
    for (const h of this.open) void h.close().catch(() => {});
    this.open.clear();
    throw new SimulatedCrash(this.crashed ?? undefined);
  }

  private alive(): void {
    if (this.crashed !== undefined) throw new SimulatedCrash(this.crashed ?? undefined);
  }

  private applyWrite(node: FileNode | undefined, data: Buffer, pos: number): void {
    if (!node) return;
    const end = pos + data.length;
    if (node.live.length < end) node.live = Buffer.concat([node.live, Buffer.alloc(end - node.live.length)]);
    else node.live = Buffer.from(node.live);
    data.copy(node.live, pos);
    this.lastWrite = { node, pos, len: data.length };
  }

  private createFile(path: string): FileNode | undefined {
    const parent = this.parentOf(path);
    if (!parent) return undefined;
    const node: FileNode = { kind: "file", live: Buffer.alloc(0), durable: Buffer.alloc(0) };
    parent.dir.live.set(parent.name, node);
    return node;
  }

  // ----------------------------------------------------------------------------------------------
  // The StoreFs the saver uses

  readonly fs: StoreFs = {
    open: async (path, flags) => {
      const creates = flags === "w" || flags === "wx";
      const { torn, fail } = creates ? this.boundary("create", path) : { torn: false, fail: undefined };
      if (!creates) this.alive();
      if (fail) throw fail;
      void torn;
      const real = await fsp.open(path, flags);
      this.open.add(real);
      let node = this.lookup(path);
      if (creates) {
        if (node?.kind === "file") node.live = Buffer.alloc(0);
        else node = this.createFile(path);
      }
      return this.handle(real, node, flags === "a+");
    },
    readFile: async (path) => {
      this.alive();
      return fsp.readFile(path);
    },
    writeFile: async (path, data) => {
      const { torn, fail } = this.boundary("writeFile", path);
      const bytes = typeof data === "string" ? Buffer.from(data, "utf8") : Buffer.from(data);
      const part = torn || fail ? bytes.subarray(0, Math.floor(bytes.length / 2)) : bytes;
      await fsp.writeFile(path, part);
      const existing = this.lookup(path);
      const node = existing?.kind === "file" ? existing : this.createFile(path);
      if (node) node.live = Buffer.alloc(0);
      this.applyWrite(node, Buffer.from(part), 0);
      if (torn && !fail) this.stop();
      if (fail) throw fail;
    },
    readdir: async (path) => {
      this.alive();
      return fsp.readdir(path);
    },
    stat: async (path) => {
      this.alive();
      return fsp.stat(path);
    },
    mkdir: async (path) => {
      const { fail } = this.boundary("mkdir", path);
      if (fail) throw fail;
      await fsp.mkdir(path, { recursive: true });
      const parts = this.rel(path);
      if (!parts) return;
      let dir = this.tree;
      for (const p of parts) {
        let next = dir.live.get(p);
        if (!next) {
          next = { kind: "dir", live: new Map(), durable: new Map() };
          dir.live.set(p, next);
        }
        if (next.kind !== "dir") return;
        dir = next;
      }
    },
    rename: async (from, to) => {
      const { fail } = this.boundary("rename", to);
      if (fail) throw fail;
      await fsp.rename(from, to);
      const src = this.parentOf(from);
      const dst = this.parentOf(to);
      const node = src?.dir.live.get(src.name);
      src?.dir.live.delete(src.name);
      if (dst && node) dst.dir.live.set(dst.name, node);
    },
    link: async (from, to) => {
      const { fail } = this.boundary("link", to);
      if (fail) throw fail;
      await fsp.link(from, to);
      const node = this.lookup(from);
      const dst = this.parentOf(to);
      if (dst && node) dst.dir.live.set(dst.name, node);
    },
    unlink: async (path) => {
      const { fail } = this.boundary("unlink", path);
      if (fail) throw fail;
      await fsp.unlink(path);
      const p = this.parentOf(path);
      p?.dir.live.delete(p.name);
    },
    rmTree: async (path) => {
      const { fail } = this.boundary("rmTree", path);
      if (fail) throw fail;
      await fsp.rm(path, { recursive: true, force: true });
      const p = this.parentOf(path);
      p?.dir.live.delete(p.name);
    },
    utimes: async (path, atime, mtime) => {
      this.alive();
      return nodeFs.utimes(path, atime, mtime);
    },
  };

  private handle(real: fsp.FileHandle, node: Node | undefined, append = false): StoreFileHandle {
    let pos = 0;
    const path = `fd ${real.fd}`;
    const label = () => (node ? this.nameOf(node) ?? path : path);
    const inside = node !== undefined;
    return {
      read: async (buffer, offset, length, position) => {
        this.alive();
        return real.read(buffer, offset, length, position);
      },
      stat: async () => {
        this.alive();
        return real.stat();
      },
      write: async (buffer, offset, length, position) => {
        const { torn, fail } = inside ? this.boundary("write", label()) : (this.alive(), { torn: false, fail: undefined });
        // An "a+" handle (O_APPEND) always writes at the file's end, whatever the position.
        const at = append && node?.kind === "file" ? node.live.length : (position ?? pos);
        const len = torn || fail ? Math.floor(length / 2) : length;
        const { bytesWritten } = await real.write(buffer, offset, len, append ? null : at);
        pos = at + bytesWritten;
        if (node?.kind === "file") this.applyWrite(node, Buffer.from(buffer.subarray(offset, offset + bytesWritten)), at);
        if (torn && !fail) this.stop();
        if (fail) throw fail;
        return { bytesWritten };
      },
      truncate: async (length) => {
        const { fail } = inside ? this.boundary("truncate", label()) : (this.alive(), { fail: undefined });
        if (fail) throw fail;
        await real.truncate(length);
        if (node?.kind === "file") node.live = Buffer.from(node.live.subarray(0, length));
      },
      datasync: async () => {
        const { fail } = inside ? this.boundary("datasync", label()) : (this.alive(), { fail: undefined });
        if (fail) throw fail;
        await real.datasync();
        this.persist(node);
      },
      sync: async () => {
        const { fail } = inside ? this.boundary("sync", label()) : (this.alive(), { fail: undefined });
        if (fail) throw fail;
        await real.sync();
        this.persist(node);
      },
      close: async () => {
        if (!this.open.delete(real)) return;
        await real.close();
      },
    };
  }

  private persist(node: Node | undefined): void {
    if (node?.kind === "file") node.durable = Buffer.from(node.live);
    else if (node?.kind === "dir") node.durable = new Map(node.live);
  }

  /** A live path of a node (for naming boundaries). */
  private nameOf(target: Node): string | undefined {
    const walk = (dir: DirNode, at: string): string | undefined => {
      for (const [name, node] of dir.live) {
        const path = join(at, name);
        if (node === target) return path;
        if (node.kind === "dir") {
          const found = walk(node, path);
          if (found) return found;
        }
      }
      return undefined;
    };
    return walk(this.tree, this.root);
  }

  /** Close every real file this layer opened (after a test is done with a saver it abandoned). */
  async release(): Promise<void> {
    for (const h of this.open) await h.close().catch(() => {});
    this.open.clear();
  }

  // ----------------------------------------------------------------------------------------------
  // What a crash leaves

  /**
   * Write into `target` (an empty folder) what the disk under `root` could hold after the crash, as one
   * variant. Returns a hash of what was written, so identical outcomes can be checked once.
   */
  async materialize(variant: CrashVariant, target: string): Promise<string> {
    const hash = createHash("sha256");
    if (variant === "process") {
      await fsp.cp(this.root, target, { recursive: true });
      await hashTree(target, "", hash);
      return hash.digest("hex");
    }
    const names = variant === "power-names" ? "live" : "durable";
    const torn = variant === "power-torn" ? this.lastWrite : undefined;
    const content = (node: FileNode): Buffer => {
      if (variant === "power-zeros" && node.live.length > node.durable.length) {
        return Buffer.concat([node.durable, Buffer.alloc(node.live.length - node.durable.length)]);
      }
      if (torn && torn.node === node && !node.durable.equals(node.live)) {
        const cut = torn.pos + Math.floor(torn.len / 2);
        return Buffer.from(node.live.subarray(0, Math.max(0, cut)));
      }
      return node.durable;
    };
    const write = async (dir: DirNode, at: string, rel: string) => {
      for (const [name, node] of [...dir[names]].sort(([a], [b]) => (a < b ? -1 : 1))) {
        const path = join(at, name);
        if (node.kind === "dir") {
          hash.update(`d ${rel}/${name}\n`);
          await fsp.mkdir(path, { recursive: true });
          await write(node, path, `${rel}/${name}`);
        } else {
          const bytes = content(node);
          hash.update(`f ${rel}/${name} ${bytes.length}\n`).update(bytes);
          await fsp.writeFile(path, bytes);
        }
      }
    };
    await fsp.mkdir(target, { recursive: true });
    await write(this.tree, target, "");
    return hash.digest("hex");
  }
}

async function snapshot(path: string): Promise<DirNode> {
  const dir: DirNode = { kind: "dir", live: new Map(), durable: new Map() };
  for (const entry of await fsp.readdir(path, { withFileTypes: true })) {
    const child = join(path, entry.name);
    const node: Node = entry.isDirectory()
      ? await snapshot(child)
      : { kind: "file", live: await fsp.readFile(child), durable: Buffer.alloc(0) };
    if (node.kind === "file") node.durable = Buffer.from(node.live);
    dir.live.set(entry.name, node);
    dir.durable.set(entry.name, node);
  }
  return dir;
}

async function hashTree(path: string, rel: string, hash: ReturnType<typeof createHash>): Promise<void> {
  const entries = (await fsp.readdir(path, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1));
  for (const e of entries) {
    const child = join(path, e.name);
    if (e.isDirectory()) {
      hash.update(`d ${rel}/${e.name}\n`);
      await hashTree(child, `${rel}/${e.name}`, hash);
    } else {
      const bytes = await fsp.readFile(child);
      hash.update(`f ${rel}/${e.name} ${bytes.length}\n`).update(bytes);
    }
  }
}

/** The short name of a boundary's file, for test titles. */
export function describeBoundary(b: Boundary, root: string): string {
  const rel = relative(root, b.path) || basename(b.path);
  return `#${b.n} ${b.op} ${rel}`;
}
