/**
 * The few assertions the tests use, on top of `node:assert` (JSR's @std/assert is out of reach),
 * with @std/assert's names so tests read the usual way.
 * @module
 */
import nodeAssert from "node:assert/strict";

/** Fails unless `condition` is truthy. */
export function assert(condition: unknown, message?: string): asserts condition {
  nodeAssert.ok(condition, message as string);
}

/** Fails unless `actual` and `expected` are deeply equal. */
export function assertEquals<T>(actual: unknown, expected: T, message?: string): void {
  nodeAssert.deepStrictEqual(actual, expected, message as string);
}

/** Fails unless `actual` matches `pattern`. */
export function assertMatch(actual: string, pattern: RegExp, message?: string): void {
  nodeAssert.match(actual, pattern, message as string);
}

/** Fails unless `fn` rejects with an instance of `ErrorClass` whose message includes `text`. */
export async function assertRejects<E extends Error>(
  fn: () => Promise<unknown>,
  // deno-lint-ignore no-explicit-any
  ErrorClass: new (...args: any[]) => E,
  text?: string,
): Promise<E> {
  try {
    await fn();
  } catch (error) {
    if (!(error instanceof ErrorClass)) {
      throw new nodeAssert.AssertionError({
        message: `Expected ${ErrorClass.name}, got ${error}`,
        actual: error,
        expected: ErrorClass,
      });
    }
    if (text !== undefined) {
      nodeAssert.ok(error.message.includes(text), `"${error.message}" lacks "${text}"`);
    }
    return error;
  }
  throw new nodeAssert.AssertionError({
    message: `Expected a ${ErrorClass.name}, nothing was thrown`,
  });
}
