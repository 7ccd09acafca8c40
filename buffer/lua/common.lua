-- Shared by every script (prepended by replay_buffer.py). KEYS is always the same list:
local K_PAYLOAD, K_READY, K_LIVE, K_CLAIMED, K_CLAIMS, K_USES, K_VCOUNT,
      K_COUNTERS, K_SAMPLED, K_ACKED, K_LEASES, K_QUARANTINE, K_VERSION, K_PRODUCERS, K_HELD,
      K_DELIVERIES, K_REQUESTS, K_EPOCH, K_REPLAY, K_PENDING, K_SAMPLED_USES =
      KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7],
      KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13], KEYS[14], KEYS[15], KEYS[16],
      KEYS[17], KEYS[18], KEYS[19], KEYS[20], KEYS[21]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function current_version()
  return tonumber(redis.call('GET', K_VERSION) or '0')
end

-- redis.call(command, key, ...) over a long argument list, in chunks that fit Lua's stack.
local function call_chunked(command, key, items)
  for i = 1, #items, 512 do
    redis.call(command, key, unpack(items, i, math.min(i + 511, #items)))
  end
end

-- Each group's encoded bytes are a string key of their own, so that `put` can write them
-- with plain SETs and `sample` can read them with SORT ... GET (never copied through Lua).
local function payload_key(id)
  return K_PAYLOAD .. ':' .. id
end

-- Forget stored groups entirely: payloads, indexes, byte and version counts.
local function remove_entries(ids)
  if #ids == 0 then return end
  local versions = redis.call('ZMSCORE', K_LIVE, unpack(ids))
  local freed = 0
  local per_version = {}
  local keys = {}
  for i, id in ipairs(ids) do
    keys[i] = payload_key(id)
    freed = freed + redis.call('STRLEN', keys[i])
    if versions[i] then per_version[versions[i]] = (per_version[versions[i]] or 0) + 1 end
  end
  for i = 1, #keys, 512 do redis.call('DEL', unpack(keys, i, math.min(i + 511, #keys))) end
  call_chunked('ZREM', K_READY, ids)
  call_chunked('ZREM', K_REPLAY, ids)
  call_chunked('ZREM', K_LIVE, ids)
  call_chunked('HDEL', K_USES, ids)
  call_chunked('HDEL', K_PENDING, ids)
  call_chunked('HDEL', K_DELIVERIES, ids)
  -- Never -0: Lua writes it as "-0", which HINCRBY refuses.
  if freed > 0 then redis.call('HINCRBY', K_COUNTERS, 'bytes', -freed) end
  for version, count in pairs(per_version) do
    if redis.call('HINCRBY', K_VCOUNT, version, -count) <= 0 then
      redis.call('HDEL', K_VCOUNT, version)
    end
  end
  return freed
end

-- Claims are recorded per `sample` call (its token), not per group: `claimed` holds each
-- token's visibility deadline and `claims` the ids it still holds, packed. Claiming or
-- acking a batch then costs a few commands whatever its size; per-group records made up
-- a third of the claim script's server time.
local function held_ids(token)
  local packed = redis.call('HGET', K_CLAIMS, token)
  if not packed then return {} end
  return cmsgpack.unpack(packed)
end

local function forget_claims(token)
  redis.call('HDEL', K_CLAIMS, token)
  redis.call('ZREM', K_CLAIMED, token)
end

-- Split `ids` into those `token` holds (each once) and the rest. Also returns the ids it
-- holds, and a set of them from which the ones in `ids` are cleared.
local function sort_claims(token, ids)
  local held = held_ids(token)
  local holding = {}
  for _, id in ipairs(held) do holding[id] = true end
  local mine, others = {}, {}
  for _, id in ipairs(ids) do
    if holding[id] then
      mine[#mine + 1] = id
      holding[id] = false
    else
      others[#others + 1] = id
    end
  end
  return mine, others, held, holding
end

-- `sort_claims`, after which the token keeps only the ids it held that are not in `ids`.
local function release_claims(token, ids)
  local mine, others, held, holding = sort_claims(token, ids)
  if #mine == 0 then return mine, others end
  local kept = {}
  for _, id in ipairs(held) do
    if holding[id] then kept[#kept + 1] = id end
  end
  if #kept == 0 then
    forget_claims(token)
  else
    redis.call('HSET', K_CLAIMS, token, cmsgpack.pack(kept))
  end
  return mine, others
end

-- Uses (buffer.replay): `uses` counts the times a group was handed out and not given
-- back, `pending` those of them not acked yet. A group waits in `ready` before its first
-- use and in `replay` between uses; while claimed it is in neither, unless its trained
-- use was released for the next one before its checkpoint acked it.

-- Give back a use that never reached a committed update (its consumer died, or its claim
-- expired): the group is offered again for that same use, in `ready` if it was its first.
local function give_back_use(id)
  local version = redis.call('ZSCORE', K_LIVE, id)
  if not version then return end  -- dropped as stale or quarantined meanwhile
  if redis.call('HINCRBY', K_PENDING, id, -1) <= 0 then redis.call('HDEL', K_PENDING, id) end
  if redis.call('HINCRBY', K_USES, id, -1) <= 0 then
    redis.call('HDEL', K_USES, id)
    redis.call('ZREM', K_REPLAY, id)
    redis.call('ZADD', K_READY, version, id)
  else
    redis.call('ZADD', K_REPLAY, version, id)
  end
end

-- Claims whose visibility deadline passed are given back: their consumer died.
local function requeue_expired_claims(now)
  local expired = redis.call('ZRANGEBYSCORE', K_CLAIMED, '-inf', now)
  local requeued = 0
  for _, token in ipairs(expired) do
    for _, id in ipairs(held_ids(token)) do
      give_back_use(id)
      requeued = requeued + 1
    end
    forget_claims(token)
  end
  if requeued > 0 then redis.call('HINCRBY', K_COUNTERS, 'redelivered', requeued) end
end

-- After a use was trained: offer the group for its next one while it has uses left and
-- is worth it (`replayable`: its rewards differ, so it still has a gradient to give).
-- Returns 1 when offered now, 2 when it already was (or waits in `ready`), 0 otherwise.
local function offer_replay(id, replay, replayable)
  if redis.call('ZSCORE', K_REPLAY, id) or redis.call('ZSCORE', K_READY, id) then return 2 end
  local version = redis.call('ZSCORE', K_LIVE, id)
  if not replayable or not version then return 0 end
  if tonumber(redis.call('HGET', K_USES, id) or '0') >= replay then return 0 end
  redis.call('ZADD', K_REPLAY, version, id)
  return 1
end

-- An admitted slot that will never be trained (lease expired or released, group dropped,
-- quarantined or a duplicate) is given back, or the learner would wait forever for groups
-- that admission control no longer allows. Clamped at 0 for runs without admission control.
local function release_admission(n)
  if n <= 0 then return end
  local admitted = tonumber(redis.call('HGET', K_COUNTERS, 'admitted') or '0')
  redis.call('HSET', K_COUNTERS, 'admitted', math.max(0, admitted - n))
end

local function purge_expired_leases(now)
  local expired = redis.call('ZREMRANGEBYSCORE', K_LEASES, '-inf', now)
  if expired > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'leases_expired', expired)
    release_admission(expired)
  end
end

-- Move a stored entry to the quarantine list with its reason, and forget it.
local function quarantine_entry(id, reason, producer)
  local payload = redis.call('GET', payload_key(id)) or ''
  remove_entries({id})
  redis.call('RPUSH', K_QUARANTINE, cmsgpack.pack({id = id, reason = reason, at_ms = now_ms(),
                                                   payload = payload, producer = producer or ''}))
  redis.call('HINCRBY', K_COUNTERS, 'quarantined', 1)
  release_admission(1)
end
