"""Development only: `broker dev`, its demo keys and the throwaway stack tests use too."""
