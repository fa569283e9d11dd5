/**
 * The Lua scripts of the directory's state in Redis (`directory/redis_store.ts`). Every change
 * is one script, which Redis runs whole and alone: heartbeats and registrations racing on two
 * replicas never see or leave a half-done index. Time is Redis's own (TIME), so replicas whose
 * clocks differ agree on who is live.
 *
 * Keys, under a prefix P (ARGV[1]):
 *
 * - `P peers`: zset, peer id -> the ms its ttl runs out: who is live, and who to reap.
 * - `P order`: zset, peer id -> its arrival number: the order `GET /peers` pages in.
 * - `P p:<id>`: hash, a peer: secret, source, address, holder (JSON), file, name (JSON), frags
 *   (JSON list), n (its length), body, exp (its score in `P peers` again, for locate).
 * - `P addr`: hash, "host:port" -> peer id. `P src`: hash, client address -> peers from it.
 * - `P indexed`: the fragments in all peers' lists, together. `P seq`: the arrival counter.
 * - `P f:<name>`: set, the ids of a fragment name's holders; `P g:<file>:<name>`: those of one
 *   file ("" for peers that name none). `P names`: zset, name -> arrival number.
 * - `P m:<id>`: hash, a file: manifest (JSON), shape (what makes two publications the same),
 *   with a Redis TTL that runs out one ttl after its last live holder. `P files`: zset, file id
 *   -> the same moment; `P fn`: hash, id -> fragment count; `P fnames`: hash, id -> name;
 *   `P filefrags`: the fragments of all listed files, together.
 *
 * A peer's ttl is its score in `P peers`. Expired peers are left out of every answer, and
 * removed with their index entries by the next script that changes anything ({@link LIB}
 * `reap`), at most a few hundred at a time: no replica runs a timer.
 *
 * Replicas keep locate answers for a moment (`directory/locate_cache.ts`). A script that changes
 * the holders of a holder set (`f:<name>`, `g:<file>:<name>`: an index entry added or removed, or
 * a holder's address or ports changed) publishes those keys, as a JSON list, on channel
 * `P locates`, and answers them to its caller too; every replica subscribes and drops them. A
 * heartbeat that only moves a ttl publishes nothing, and neither do files (a locate never reads
 * them).
 * @module
 */

/** Helpers every script starts with. */
const LIB = `
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function expiry(id)
  local s = redis.call('ZSCORE', P .. 'peers', id)
  if s then return tonumber(s) end
  return nil
end
local function is_live(id, now)
  local e = expiry(id)
  return e ~= nil and e > now
end
-- A peer's expiry is kept twice: its score (to count and reap) and in its hash (so that a locate
-- reads a holder and whether it is live in one call).
local function set_expiry(id, e)
  redis.call('ZADD', P .. 'peers', e, id)
  redis.call('HSET', P .. 'p:' .. id, 'exp', e)
end
-- The holder sets (keys after P) whose live holders this script changed, for 'announce'.
local touched, touched_list = {}, {}
local function touch(key)
  if not touched[key] then
    touched[key] = true
    touched_list[#touched_list + 1] = key
  end
end
-- Publishes the touched keys to the replicas' locate caches; answers them as JSON, '' for none.
local function announce()
  if #touched_list == 0 then return '' end
  local keys = cjson.encode(touched_list)
  redis.call('PUBLISH', P .. 'locates', keys)
  return keys
end
local function index(id, file, name)
  local f = P .. 'f:' .. name
  if redis.call('SADD', f, id) == 1 then
    touch('f:' .. name)
    if redis.call('SCARD', f) == 1 then
      redis.call('ZADD', P .. 'names', 'NX', redis.call('INCR', P .. 'seq'), name)
    end
  end
  if redis.call('SADD', P .. 'g:' .. file .. ':' .. name, id) == 1 then
    touch('g:' .. file .. ':' .. name)
  end
end
local function unindex(id, file, name)
  if redis.call('SREM', P .. 'f:' .. name, id) == 1 then touch('f:' .. name) end
  if redis.call('SREM', P .. 'g:' .. file .. ':' .. name, id) == 1 then
    touch('g:' .. file .. ':' .. name)
  end
  if redis.call('EXISTS', P .. 'f:' .. name) == 0 then redis.call('ZREM', P .. 'names', name) end
end
local function count_source(source, delta)
  if redis.call('HINCRBY', P .. 'src', source, delta) <= 0 then
    redis.call('HDEL', P .. 'src', source)
  end
end
local function remove_peer(id)
  local key = P .. 'p:' .. id
  local r = redis.call('HMGET', key, 'file', 'frags', 'source', 'address')
  if r[2] then
    local frags = cjson.decode(r[2])
    for _, name in ipairs(frags) do unindex(id, r[1], name) end
    redis.call('DECRBY', P .. 'indexed', #frags)
  end
  if r[3] then count_source(r[3], -1) end
  if r[4] and redis.call('HGET', P .. 'addr', r[4]) == id then redis.call('HDEL', P .. 'addr', r[4]) end
  redis.call('DEL', key)
  redis.call('ZREM', P .. 'peers', id)
  redis.call('ZREM', P .. 'order', id)
end
local function reap(now, limit)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'peers', '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do remove_peer(id) end
  return #ids
end
local function drop_file(id)
  local n = redis.call('HGET', P .. 'fn', id)
  if n then redis.call('DECRBY', P .. 'filefrags', n) end
  redis.call('HDEL', P .. 'fn', id)
  redis.call('HDEL', P .. 'fnames', id)
  redis.call('ZREM', P .. 'files', id)
  redis.call('DEL', P .. 'm:' .. id)
end
local function trim_files(now)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'files', '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(ids) do drop_file(id) end
end
-- A listed file is kept until 'until': a live peer of it holds fragments, or it was published.
local function back(file, until_ms)
  local m = P .. 'm:' .. file
  if file ~= '' and redis.call('EXISTS', m) == 1 then
    redis.call('ZADD', P .. 'files', 'XX', 'GT', until_ms, file)
    redis.call('PEXPIREAT', m, until_ms, 'GT')
  end
end
-- The live holders of a holder set as JSON texts, and the first moment one of them expires
-- (0 for none).
local function live_holders(key, now)
  local out, soonest = {}, 0
  for _, id in ipairs(redis.call('SMEMBERS', key)) do
    local r = redis.call('HMGET', P .. 'p:' .. id, 'holder', 'exp')
    local e = tonumber(r[2])
    if e and e > now then
      out[#out + 1] = r[1]
      if soonest == 0 or e < soonest then soonest = e end
    end
  end
  return out, soonest
end
`;

/** Expired peers a change reaps on its way, at most: a script blocks Redis while it runs. */
const REAP_BATCH = 256;

/**
 * ARGV: P, id, ttl ms, secret, source, body, holder, address, file, name, frags (JSON, no
 * duplicates), max peers, max per address, max indexed. Answers an UpsertOutcome (and the
 * touched keys: see {@link announcing}).
 */
const UPSERT = `
local id, ttl, secret, source, body = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local holder, address, file, name, frags_json = ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local max_peers, max_per_address, max_indexed = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local frags = cjson.decode(frags_json)
local now = now_ms()
reap(now, ${REAP_BATCH})
local key = P .. 'p:' .. id
local e = expiry(id)
if e and e <= now then remove_peer(id); e = nil end
local known = nil
if e then
  local k = redis.call('HMGET', key, 'secret', 'source', 'holder', 'file', 'name', 'frags', 'address', 'n')
  known = { secret = k[1], source = k[2], holder = k[3], file = k[4], name = k[5], frags = k[6], address = k[7], n = tonumber(k[8]) }
  if known.secret ~= secret then return 'forbidden' end
  -- The usual heartbeat repeats the peer's state: only the expiry moves.
  if known.source == source and known.holder == holder and known.file == file and known.name == name and known.frags == frags_json then
    set_expiry(id, now + ttl)
    redis.call('HSET', key, 'body', body)
    if #frags > 0 then back(file, now + 2 * ttl) end
    return 'refreshed'
  end
end
local other = nil
local other_id = redis.call('HGET', P .. 'addr', address)
if other_id and other_id ~= id then
  if is_live(other_id, now) then
    local o = redis.call('HMGET', P .. 'p:' .. other_id, 'secret', 'source', 'n')
    -- Another id at the same address: this peer before a restart, if the owner is the same.
    if o[1] ~= secret then return 'address taken' end
    other = { id = other_id, source = o[2], n = tonumber(o[3]) }
  else
    remove_peer(other_id)
  end
end
local function bound()
  if not known and not other and redis.call('ZCOUNT', P .. 'peers', '(' .. now, '+inf') >= max_peers then
    return 'too many peers'
  end
  if not known or known.source ~= source then
    local freed = (other and other.source == source) and 1 or 0
    if tonumber(redis.call('HGET', P .. 'src', source) or 0) - freed >= max_per_address then
      return 'too many from address'
    end
  end
  local freed = (known and known.n or 0) + (other and other.n or 0)
  if tonumber(redis.call('GET', P .. 'indexed') or 0) - freed + #frags > max_indexed then
    return 'too many fragments'
  end
  return nil
end
local refusal = bound()
-- Only a directory at a bound pays for reaping all the expired: one may make room.
if refusal and reap(now, 100000) > 0 then refusal = bound() end
if refusal then
  -- A live peer keeps its place, and its last state, while the index is full.
  if known and refusal == 'too many fragments' then set_expiry(id, now + ttl) end
  return refusal
end
if other then remove_peer(other.id) end
if known then
  if known.address ~= address and redis.call('HGET', P .. 'addr', known.address) == id then
    redis.call('HDEL', P .. 'addr', known.address)
  end
  if known.source ~= source then
    count_source(known.source, -1)
    count_source(source, 1)
  end
  local old = cjson.decode(known.frags)
  local was, will = {}, {}
  for _, n in ipairs(old) do was[n] = true end
  for _, n in ipairs(frags) do will[n] = true end
  -- A peer whose store now holds another file lets go of all it held for the old one.
  for _, n in ipairs(old) do
    if known.file ~= file or not will[n] then unindex(id, known.file, n) end
  end
  for _, n in ipairs(frags) do
    if known.file ~= file or not was[n] then index(id, file, n) end
  end
  redis.call('INCRBY', P .. 'indexed', #frags - #old)
  -- Same names, another address or ports: every answer listing this peer reads otherwise.
  if known.holder ~= holder then
    for _, n in ipairs(frags) do
      touch('f:' .. n)
      touch('g:' .. file .. ':' .. n)
    end
  end
else
  redis.call('ZADD', P .. 'order', redis.call('INCR', P .. 'seq'), id)
  count_source(source, 1)
  for _, n in ipairs(frags) do index(id, file, n) end
  redis.call('INCRBY', P .. 'indexed', #frags)
end
redis.call('HSET', key, 'secret', secret, 'source', source, 'holder', holder, 'file', file,
  'name', name, 'frags', frags_json, 'n', #frags, 'address', address, 'body', body)
set_expiry(id, now + ttl)
redis.call('HSET', P .. 'addr', address, id)
if #frags > 0 then back(file, now + 2 * ttl) end
if known then return 'refreshed' end
return 'created'
`;

/** ARGV: P, id, ttl ms, secret, body, source. 1 when the body repeats the last one. */
const REFRESH = `
local id, ttl = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
if not is_live(id, now) then return 0 end
local k = redis.call('HMGET', P .. 'p:' .. id, 'body', 'source', 'secret', 'file', 'n')
if k[1] ~= ARGV[5] or k[2] ~= ARGV[6] or k[3] ~= ARGV[4] then return 0 end
set_expiry(id, now + ttl)
if tonumber(k[5]) > 0 then back(k[4], now + 2 * ttl) end
return 1
`;

/** ARGV: P, id. The secret of live peer id, or nil. */
const SECRET = `
if not is_live(ARGV[2], now_ms()) then return nil end
return redis.call('HGET', P .. 'p:' .. ARGV[2], 'secret')
`;

/** ARGV: P, id. 1 when it removed a live peer (and the touched keys: see {@link announcing}). */
const REMOVE = `
local e = expiry(ARGV[2])
if not e then return 0 end
remove_peer(ARGV[2])
if e > now_ms() then return 1 end
return 0
`;

/**
 * ARGV: P, the key of a holder set after P. { now, the first moment a holder expires (0 for
 * none), { holder... } }: the live holders as JSON texts, and how long that answer holds by
 * Redis's clock.
 */
const LOCATE = `
local now = now_ms()
local holders, soonest = live_holders(P .. ARGV[2], now)
return { now, soonest, holders }
`;

/**
 * ARGV: P, cursor, limit, max items. { next or '', { holder, frags, name }... } of the live
 * peers from arrival number cursor on.
 */
const PEERS = `
local cursor, limit, max_items = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local out, items, scanned = {}, 0, 0
while true do
  local batch = redis.call('ZRANGEBYSCORE', P .. 'order', cursor, '+inf', 'WITHSCORES', 'LIMIT', 0, 200)
  if #batch == 0 then return { '', out } end
  for i = 1, #batch, 2 do
    local id, seq = batch[i], batch[i + 1]
    if is_live(id, now) then
      if #out >= limit or items >= max_items or scanned >= limit + 5000 then return { seq, out } end
      local r = redis.call('HMGET', P .. 'p:' .. id, 'holder', 'frags', 'name', 'n')
      out[#out + 1] = { r[1], r[2], r[3] }
      items = items + tonumber(r[4])
    end
    scanned = scanned + 1
    cursor = tonumber(seq) + 1
  end
end
`;

/**
 * ARGV: P, cursor, limit, max items, file ('' for every file), whether a file is given.
 * { next or '', { name, { holder... } }... } of the names with a live holder.
 */
const FRAGMENTS = `
local cursor, limit, max_items = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local file, by_file = ARGV[5], ARGV[6] == '1'
local now = now_ms()
local out, items, scanned = {}, 0, 0
while true do
  local batch = redis.call('ZRANGEBYSCORE', P .. 'names', cursor, '+inf', 'WITHSCORES', 'LIMIT', 0, 200)
  if #batch == 0 then return { '', out } end
  for i = 1, #batch, 2 do
    local name, seq = batch[i], batch[i + 1]
    local key = P .. 'f:' .. name
    if by_file then key = P .. 'g:' .. file .. ':' .. name end
    local holders = live_holders(key, now)
    if #holders > 0 then
      if #out >= limit or items >= max_items or scanned >= limit + 5000 then return { seq, out } end
      out[#out + 1] = { name, holders }
      items = items + #holders
    end
    scanned = scanned + 1
    cursor = tonumber(seq) + 1
  end
end
`;

/**
 * ARGV: P, id, manifest (JSON), shape, fragment count, name, ttl ms, max files, max file
 * fragments. Answers a PublishOutcome.
 */
const PUBLISH = `
local id, manifest, shape, n, name = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local ttl, max_files, max_fragments = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local now = now_ms()
trim_files(now)
local m = P .. 'm:' .. id
local known = redis.call('HGET', m, 'shape')
if known then
  if known ~= shape then return 'conflict' end
  back(id, now + ttl)
  return 'unchanged'
end
-- Its key ran out before it was trimmed: drop what is left of it.
if redis.call('ZSCORE', P .. 'files', id) then drop_file(id) end
if redis.call('ZCARD', P .. 'files') >= max_files then return 'too many files' end
if tonumber(redis.call('GET', P .. 'filefrags') or 0) + n > max_fragments then
  return 'too many fragments'
end
redis.call('HSET', m, 'manifest', manifest, 'shape', shape)
redis.call('PEXPIREAT', m, now + ttl)
redis.call('ZADD', P .. 'files', now + ttl, id)
redis.call('HSET', P .. 'fn', id, n)
redis.call('HSET', P .. 'fnames', id, name)
redis.call('INCRBY', P .. 'filefrags', n)
return 'created'
`;

/** ARGV: P. { peers, fragment names, files } live now. */
const COUNTS = `
local now = now_ms()
trim_files(now)
return { redis.call('ZCOUNT', P .. 'peers', '(' .. now, '+inf'), redis.call('ZCARD', P .. 'names'),
  redis.call('ZCARD', P .. 'files') }
`;

/** ARGV: P. { id, name, id, name... } of the listed files. */
const FILE_NAMES = `
trim_files(now_ms())
local ids = redis.call('ZRANGE', P .. 'files', 0, -1)
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', P .. 'fnames', id) or ''
end
return out
`;

/**
 * ARGV: P, then file ids (none: every listed file). { manifest, available (0 or 1), seeders }
 * of each that is listed.
 */
const SUMMARIES = `
local now = now_ms()
trim_files(now)
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then ids = redis.call('ZRANGE', P .. 'files', 0, -1) end
local out = {}
for _, id in ipairs(ids) do
  local manifest = redis.call('HGET', P .. 'm:' .. id, 'manifest')
  if manifest then
    local keys, distinct, available = {}, {}, 1
    for _, fragment in ipairs(cjson.decode(manifest).fragments) do
      local key = P .. 'g:' .. id .. ':' .. fragment.name
      if not distinct[key] then
        distinct[key] = true
        keys[#keys + 1] = key
      end
    end
    for _, key in ipairs(keys) do
      local any = false
      for _, peer in ipairs(redis.call('SMEMBERS', key)) do
        if is_live(peer, now) then any = true; break end
      end
      if not any then available = 0; break end
    end
    -- Live peers of the file that hold every name: each holder of the first, checked in the
    -- others (no SINTER: a manifest's thousands of keys would overflow Lua's stack).
    local seeders = 0
    if #keys > 0 then
      for _, peer in ipairs(redis.call('SMEMBERS', keys[1])) do
        local r = redis.call('HMGET', P .. 'p:' .. peer, 'exp', 'n')
        if r[1] and tonumber(r[1]) > now and tonumber(r[2]) >= #keys then
          local all = true
          for i = 2, #keys do
            if redis.call('SISMEMBER', keys[i], peer) == 0 then all = false; break end
          end
          if all then seeders = seeders + 1 end
        end
      end
    end
    out[#out + 1] = { manifest, available, seeders }
  end
end
return out
`;

/**
 * ARGV: P, id, holders per fragment at most. nil when not listed; else { manifest, { count,
 * { holder... } }... }, each fragment's live holders of that file, a random run of them past
 * the bound.
 */
const FILE = `
local id, most = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local manifest = redis.call('HGET', P .. 'm:' .. id, 'manifest')
if not manifest then return nil end
local out = {}
for _, fragment in ipairs(cjson.decode(manifest).fragments) do
  local holders = live_holders(P .. 'g:' .. id .. ':' .. fragment.name, now)
  local count, sample = #holders, holders
  if count > most then
    sample = {}
    local start = math.random(count)
    for i = 0, most - 1 do sample[#sample + 1] = holders[(start + i - 1) % count + 1] end
  end
  out[#out + 1] = { count, sample }
end
return { manifest, out }
`;

/**
 * A script that may change holder sets, run so that it announces them: { its answer, the
 * touched keys as a JSON list or '' }. Its returns end a function, not the script.
 */
function announcing(body: string): string {
  return `
local function body()
${body}
end
local answer = body()
return { answer, announce() }
`;
}

/** The scripts' own bodies, by name. */
const BODIES = {
  UPSERT: announcing(UPSERT),
  REFRESH,
  SECRET,
  REMOVE: announcing(REMOVE),
  LOCATE,
  PEERS,
  FRAGMENTS,
  PUBLISH,
  COUNTS,
  FILE_NAMES,
  SUMMARIES,
  FILE,
};

/** The scripts, each with the helpers before it. */
export const SCRIPTS = Object.fromEntries(
  Object.entries(BODIES).map(([name, body]) => [name, LIB + body]),
) as Record<keyof typeof BODIES, string>;
