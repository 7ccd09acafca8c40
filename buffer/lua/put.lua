-- Store one encoded group. ARGV: id, min_version, max_version, payload, producer,
-- n_tokens, capacity_groups, capacity_bytes, overflow ('block'|'drop_oldest'),
-- dedup_window_ms, lease ('' when admission control is off), producer_key.
-- Returns 'ok', 'duplicate' or 'full' (nothing written).
local id, min_version, max_version, payload = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local producer, n_tokens = ARGV[5], tonumber(ARGV[6])
local capacity_groups, capacity_bytes, overflow = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local dedup_window_ms, lease, producer_key = tonumber(ARGV[10]), ARGV[11], ARGV[12]
local now = now_ms()

-- A retried put of a group that is stored, or was acked recently, is not stored twice.
redis.call('ZREMRANGEBYSCORE', K_ACKED, '-inf', now - dedup_window_ms)
if redis.call('HEXISTS', K_PAYLOAD, id) == 1 or redis.call('ZSCORE', K_ACKED, id) then
  redis.call('HINCRBY', K_COUNTERS, 'duplicates', 1)
  if lease ~= '' and redis.call('ZREM', K_LEASES, lease) == 1 then release_admission(1) end
  return 'duplicate'
end

local size = #payload
local function fits()
  local bytes = tonumber(redis.call('HGET', K_COUNTERS, 'bytes') or '0')
  return redis.call('ZCARD', K_LIVE) + 1 <= capacity_groups and bytes + size <= capacity_bytes
end
if not fits() then
  if overflow ~= 'drop_oldest' then return 'full' end
  -- Evict the oldest ready groups (never claimed ones: a learner is training on them).
  while not fits() do
    local oldest = redis.call('ZRANGE', K_READY, 0, 0)
    if #oldest == 0 then return 'full' end
    remove_entry(oldest[1])
    redis.call('HINCRBY', K_COUNTERS, 'dropped_capacity', 1)
    release_admission(1)
  end
end

redis.call('HSET', K_PAYLOAD, id, payload)
redis.call('ZADD', K_READY, min_version, id)
redis.call('ZADD', K_LIVE, min_version, id)
redis.call('HINCRBY', K_VCOUNT, min_version, 1)
redis.call('HINCRBY', K_COUNTERS, 'bytes', size)
redis.call('HINCRBY', K_COUNTERS, 'put', 1)
redis.call('HINCRBY', K_COUNTERS, 'put_tokens', n_tokens)
redis.call('HINCRBY', K_COUNTERS, 'put_bytes', size)
if lease ~= '' then redis.call('ZREM', K_LEASES, lease) end
redis.call('SADD', K_PRODUCERS, producer)
redis.call('HINCRBY', producer_key, 'groups', 1)
redis.call('HINCRBY', producer_key, 'tokens', n_tokens)
redis.call('HSETNX', producer_key, 'first_put_ms', now)
redis.call('HSET', producer_key, 'last_put_ms', now, 'last_version', max_version)
return 'ok'
