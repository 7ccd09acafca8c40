-- Finish claims after a learner step. ARGV: token, max_reuse, id1, id2, ...
-- A claim that expired (and may have been handed to another consumer) is not acked by
-- its late first owner: only the token holding the claim can ack it.
-- Returns {stale_claims, reused, acked_id1, acked_id2, ...}.
local token, max_reuse = ARGV[1], tonumber(ARGV[2])
local result = {0, 0}
if #ARGV < 3 then return result end
local mine, others = release_claims(token, {unpack(ARGV, 3)})
local stale = #others
if #mine > 0 then
  call_chunked('HDEL', K_DELIVERIES, mine)  -- trained: its failed deliveries start again
  local uses = redis.call('HMGET', K_REUSE, unpack(mine))
  local finished, tombstones, replay, replay_uses = {}, {}, {}, {}
  local stamp = tostring(now_ms())  -- converted once, not once per tombstone
  for i, id in ipairs(mine) do
    local used = tonumber(uses[i] or '0')
    if used < max_reuse then
      replay[#replay + 1] = id
      replay_uses[#replay_uses + 1] = used + 1
    else
      finished[#finished + 1] = id
      tombstones[#tombstones + 1] = stamp
      tombstones[#tombstones + 1] = id
    end
    result[#result + 1] = id
  end
  if #replay > 0 then
    -- Deliberate off-policy replay: back to ready under its version, its use counted.
    local versions = redis.call('ZMSCORE', K_LIVE, unpack(replay))
    for i, id in ipairs(replay) do
      redis.call('HSET', K_REUSE, id, replay_uses[i])
      redis.call('ZADD', K_READY, versions[i], id)
    end
    redis.call('HINCRBY', K_COUNTERS, 'reused', #replay)
  end
  remove_entries(finished)
  if #tombstones > 0 then call_chunked('ZADD', K_ACKED, tombstones) end
  redis.call('HINCRBY', K_COUNTERS, 'acked', #mine)
  result[2] = #replay
end
if stale > 0 then redis.call('HINCRBY', K_COUNTERS, 'stale_acks', stale) end
result[1] = stale
return result
