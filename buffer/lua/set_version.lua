-- Make `version` the policy version actors generate with. ARGV: version.
-- Versions only grow: a lower or equal version changes nothing. Returns the version now.
local version = tonumber(ARGV[1])
local current = current_version()
if version > current then
  redis.call('SET', K_VERSION, version)
  return version
end
return current
